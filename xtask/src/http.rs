//! Just enough HTTP/1.1 on std's TCP for the demo: a client (one request a connection,
//! `Connection: close`) and a server that answers on a thread of its own.
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, bail};

/// Largest request or response head read.
const MAX_HEAD: usize = 16 * 1024;
const TIMEOUT: Duration = Duration::from_secs(5);

/// An answer received.
#[derive(Debug)]
pub(crate) struct Response {
    pub(crate) status: u16,
    pub(crate) reason: String,
    pub(crate) body: String,
}

/// `http://IP:PORT/PATH?QUERY` → (the address, `/PATH?QUERY`). Only IP literals: the demo
/// never resolves names.
pub(crate) fn split_url(url: &str) -> anyhow::Result<(SocketAddr, String)> {
    let rest = url
        .strip_prefix("http://")
        .with_context(|| format!("not an http:// URL: {url:?}"))?;
    let (host, path) = match rest.find(['/', '?']) {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr: SocketAddr = host
        .parse()
        .with_context(|| format!("{url:?}: the host must be IP:PORT"))?;
    let path = if path.starts_with('?') {
        format!("/{path}")
    } else {
        path.to_owned()
    };
    Ok((addr, path))
}

/// `GET url`.
pub(crate) fn get(url: &str) -> anyhow::Result<Response> {
    let (addr, path) = split_url(url)?;
    exchange(addr, "GET", &path, None).with_context(|| format!("GET {url}"))
}

/// `POST path` with a form body (`application/x-www-form-urlencoded`).
pub(crate) fn post_form(addr: SocketAddr, path: &str, form: &str) -> anyhow::Result<Response> {
    exchange(
        addr,
        "POST",
        path,
        Some(("application/x-www-form-urlencoded", form)),
    )
    .with_context(|| format!("POST http://{addr}{path}"))
}

/// `POST path` with a JSON body.
pub(crate) fn post_json(addr: SocketAddr, path: &str, json: &str) -> anyhow::Result<Response> {
    exchange(addr, "POST", path, Some(("application/json", json)))
        .with_context(|| format!("POST http://{addr}{path}"))
}

fn exchange(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<(&str, &str)>,
) -> anyhow::Result<Response> {
    let mut stream = TcpStream::connect_timeout(&addr, TIMEOUT)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some((content_type, text)) = body {
        request.push_str(&format!(
            "Content-Type: {content_type}\r\nContent-Length: {}\r\n",
            text.len()
        ));
    }
    request.push_str("\r\n");
    if let Some((_, text)) = body {
        request.push_str(text);
    }
    stream.write_all(request.as_bytes())?;
    let mut raw = Vec::new();
    stream
        .take(4 * 1024 * 1024)
        .read_to_end(&mut raw)
        .context("reading the answer")?;
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> anyhow::Result<Response> {
    let end = find(raw, b"\r\n\r\n").context("no complete HTTP head in the answer")?;
    let head = std::str::from_utf8(&raw[..end]).context("HTTP head is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    if !parts.next().unwrap_or_default().starts_with("HTTP/1.") {
        bail!("not an HTTP/1 answer: {status_line:?}");
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let reason = parts.next().unwrap_or_default().to_owned();
    let (mut length, mut chunked) = (None, false);
    for line in lines {
        if let Some((name, value)) = line.split_once(':') {
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                length = value.parse::<usize>().ok();
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = value.eq_ignore_ascii_case("chunked");
            }
        }
    }
    let mut body = raw[end + 4..].to_vec();
    if chunked {
        body = dechunk(&body)?;
    } else if let Some(n) = length {
        body.truncate(n);
    }
    Ok(Response {
        status,
        reason,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

fn dechunk(mut data: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = find(data, b"\r\n").context("bad chunked body")?;
        let size_text = std::str::from_utf8(&data[..eol])?;
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16).context("bad chunk size")?;
        data = &data[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        let chunk = data.get(..size).context("short chunk")?;
        out.extend_from_slice(chunk);
        data = data.get(size + 2..).context("short chunk")?;
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// A request received by [`Server`] (its body is not read).
#[derive(Debug)]
pub(crate) struct Request {
    pub(crate) method: String,
    pub(crate) path: String,
    /// The query's `name=value` pairs, as sent (not percent-decoded).
    pub(crate) query: Vec<(String, String)>,
}

impl Request {
    pub(crate) fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// What a handler answers: status, content type, body.
pub(crate) type Answer = (u16, &'static str, String);

/// An HTTP server on 127.0.0.1:(free port), answering one connection at a time on its own
/// thread until dropped.
pub(crate) struct Server {
    pub(crate) addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    pub(crate) fn start(
        name: &str,
        handler: impl Fn(&Request) -> Answer + Send + 'static,
    ) -> anyhow::Result<Server> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .with_context(|| format!("{name}: cannot bind 127.0.0.1:0"))?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                for stream in listener.incoming() {
                    if stopping.load(Ordering::SeqCst) {
                        return;
                    }
                    if let Ok(stream) = stream {
                        // A broken connection only loses its own answer.
                        let _ = serve_one(stream, &handler);
                    }
                }
            })
            .with_context(|| format!("{name}: cannot start its thread"))?;
        Ok(Server {
            addr,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the thread blocked in accept.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn serve_one(mut stream: TcpStream, handler: &impl Fn(&Request) -> Answer) -> anyhow::Result<()> {
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 2048];
    while find(&head, b"\r\n\r\n").is_none() {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            // The wake-up connection of `Drop`, or a client that gave up.
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
        if head.len() > MAX_HEAD {
            bail!("request head too large");
        }
    }
    let text = String::from_utf8_lossy(&head);
    let first = text.lines().next().unwrap_or_default();
    let mut parts = first.split(' ');
    let method = parts.next().unwrap_or_default().to_owned();
    let target = parts.next().unwrap_or_default();
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let request = Request {
        method,
        path: path.to_owned(),
        query: query
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (n, v) = p.split_once('=').unwrap_or((p, ""));
                (n.to_owned(), v.to_owned())
            })
            .collect(),
    };
    let (status, content_type, body) = handler(&request);
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        502 => "Bad Gateway",
        _ => "Status",
    };
    let answer = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(answer.as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split() {
        let (addr, path) = split_url("http://127.0.0.1:8080/?token=abc").unwrap();
        assert_eq!(addr.port(), 8080);
        assert_eq!(path, "/?token=abc");
        assert_eq!(split_url("http://127.0.0.1:1?x=1").unwrap().1, "/?x=1");
        assert_eq!(split_url("http://127.0.0.1:1").unwrap().1, "/");
        assert!(split_url("https://127.0.0.1:1/").is_err());
        assert!(split_url("http://shop.example/").is_err());
    }

    #[test]
    fn answers_parse() {
        let r =
            parse_response(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 3\r\n\r\nabcdef").unwrap();
        assert_eq!(
            (r.status, r.reason.as_str(), r.body.as_str()),
            (403, "Forbidden", "abc")
        );
        let r = parse_response(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!(r.body, "abcde");
        assert!(parse_response(b"SIP/2.0 200 OK\r\n\r\n").is_err());
    }

    #[test]
    fn serves_and_fetches() {
        let server = Server::start("test-page", |req: &Request| {
            let who = req.param("token").unwrap_or("nobody").to_owned();
            (
                200,
                "text/plain",
                format!("{} {} {who}", req.method, req.path),
            )
        })
        .unwrap();
        let r = get(&format!("http://{}/x?token=t1", server.addr)).unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "GET /x t1"));
        let r = post_form(server.addr, "/y", "a=1").unwrap();
        assert_eq!(r.body, "POST /y nobody");
        drop(server);
    }
}
