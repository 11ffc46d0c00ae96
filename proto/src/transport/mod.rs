//! SIP over UDP and TCP on one address (tokio). The only code in `proto` that owns sockets.
//!
//! The transport parses each datagram or stream frame once, stamps `received`/`rport` into the top
//! Via of requests (RFC 3261 §18.2.1, RFC 3581), answers requests it cannot parse with the status
//! the parser chose (400, 501, 505, …) and drops responses it cannot parse. Everything else goes to
//! the user as [`Incoming`] over one channel. Responses go back per Via ([`response_target`]), on
//! the same TCP connection a request came on while it is open. CRLF keepalives are answered as
//! RFC 5626 §4.4.1 says (a double CRLF gets a single CRLF back; on UDP a double CRLF is a STUN-less
//! ping and also gets CRLF) and never reach the user.

use crate::sip::message::{self, Frame, Limits, Message, Transport as ViaTransport};
use bytes::{Buf, BytesMut};
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::mpsc;

/// How long writing one message to a TCP peer may take before the connection is dropped.
const WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Most TCP connections open at once; further ones are refused at accept.
const MAX_CONNECTIONS: usize = 10_000;

/// How long opening a TCP connection may take before the send fails.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Identifies one TCP connection for the lifetime of the transport.
pub type ConnId = u64;

/// Where a message came from or goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Target {
    pub transport: ViaTransport,
    pub addr: SocketAddr,
    /// The TCP connection to use when it is still open.
    pub conn: Option<ConnId>,
}

impl Target {
    pub fn udp(addr: SocketAddr) -> Target {
        Target {
            transport: ViaTransport::Udp,
            addr,
            conn: None,
        }
    }
    pub fn tcp(addr: SocketAddr) -> Target {
        Target {
            transport: ViaTransport::Tcp,
            addr,
            conn: None,
        }
    }
    pub fn is_reliable(&self) -> bool {
        self.transport.is_reliable()
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}",
            self.transport.as_str().to_ascii_lowercase(),
            self.addr
        )
    }
}

/// A message the transport received and parsed.
#[derive(Debug)]
pub struct Incoming {
    pub msg: Message,
    /// Where it came from (for a TCP message, with its connection).
    pub source: Target,
}

/// Settings of a transport.
#[derive(Debug, Clone, Copy)]
pub struct TransportConfig {
    /// Largest message accepted on a TCP connection.
    pub max_tcp_message: usize,
    /// Caps for every message (a UDP datagram is at most 65,535 bytes whatever this says).
    pub limits: Limits,
    /// Idle TCP connections are closed after this long.
    pub tcp_idle: std::time::Duration,
}

impl Default for TransportConfig {
    fn default() -> Self {
        TransportConfig {
            max_tcp_message: 65_535,
            limits: Limits::UDP,
            tcp_idle: std::time::Duration::from_secs(600),
        }
    }
}

struct Conn {
    peer: SocketAddr,
    tx: mpsc::UnboundedSender<Vec<u8>>,
}

/// UDP and TCP sockets bound to one address.
pub struct SipTransport {
    udp: Arc<UdpSocket>,
    local: SocketAddr,
    conns: Mutex<HashMap<ConnId, Conn>>,
    by_peer: Mutex<HashMap<SocketAddr, ConnId>>,
    next_conn: AtomicU64,
    incoming: mpsc::Sender<Incoming>,
    config: TransportConfig,
}

impl std::fmt::Debug for SipTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SipTransport")
            .field("local", &self.local)
            .finish()
    }
}

impl SipTransport {
    /// Binds UDP and TCP on `addr` (with port 0, one free port for both) and starts receiving.
    /// Received messages arrive on the returned channel. The tasks stop when the transport is
    /// dropped and the channel closed.
    pub async fn bind(
        addr: SocketAddr,
        config: TransportConfig,
    ) -> io::Result<(Arc<SipTransport>, mpsc::Receiver<Incoming>)> {
        let (udp, listener) = bind_pair(addr).await?;
        let local = udp.local_addr()?;
        let (tx, rx) = mpsc::channel(8192);
        let transport = Arc::new(SipTransport {
            udp: Arc::new(udp),
            local,
            conns: Mutex::new(HashMap::new()),
            by_peer: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(1),
            incoming: tx,
            config,
        });
        tokio::spawn(udp_loop(Arc::downgrade(&transport), transport.udp.clone()));
        tokio::spawn(accept_loop(Arc::downgrade(&transport), listener));
        Ok((transport, rx))
    }

    /// The bound address (UDP and TCP share it).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Sends a message. Over TCP, uses the given connection if it is still open, else an open one
    /// to that address, else connects.
    pub async fn send(self: &Arc<Self>, target: &Target, msg: &Message) -> io::Result<()> {
        let bytes = message::serialize(msg);
        self.send_bytes(target, bytes).await
    }

    /// Sends raw bytes (already serialised).
    pub async fn send_bytes(self: &Arc<Self>, target: &Target, bytes: Vec<u8>) -> io::Result<()> {
        match target.transport {
            ViaTransport::Udp => {
                self.udp.send_to(&bytes, target.addr).await?;
                Ok(())
            }
            ViaTransport::Tcp => {
                if let Some(tx) = self.open_conn(target) {
                    if tx.send(bytes.clone()).is_ok() {
                        return Ok(());
                    }
                }
                let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target.addr))
                    .await
                    .map_err(|_| {
                        io::Error::new(io::ErrorKind::TimedOut, "TCP connect timed out")
                    })??;
                let tx = self.start_conn(stream, target.addr);
                tx.send(bytes)
                    .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "connection closed"))
            }
            other => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("transport {} not supported", other.as_str()),
            )),
        }
    }

    /// Whether a TCP connection with this peer is open now.
    pub fn has_connection(&self, peer: SocketAddr) -> bool {
        let id = lock(&self.by_peer).get(&peer).copied();
        id.is_some_and(|id| lock(&self.conns).contains_key(&id))
    }

    fn open_conn(&self, target: &Target) -> Option<mpsc::UnboundedSender<Vec<u8>>> {
        let conns = lock(&self.conns);
        if let Some(c) = target.conn.and_then(|id| conns.get(&id)) {
            return Some(c.tx.clone());
        }
        let id = *lock(&self.by_peer).get(&target.addr)?;
        conns.get(&id).map(|c| c.tx.clone())
    }

    fn start_conn(
        self: &Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
    ) -> mpsc::UnboundedSender<Vec<u8>> {
        let id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        lock(&self.conns).insert(
            id,
            Conn {
                peer,
                tx: tx.clone(),
            },
        );
        lock(&self.by_peer).insert(peer, id);
        let _ = stream.set_nodelay(true);
        tokio::spawn(conn_task(Arc::downgrade(self), stream, peer, id, rx));
        tx
    }

    fn drop_conn(&self, id: ConnId) {
        if let Some(c) = lock(&self.conns).remove(&id) {
            let mut by_peer = lock(&self.by_peer);
            if by_peer.get(&c.peer) == Some(&id) {
                by_peer.remove(&c.peer);
            }
        }
    }

    /// Handles one received message: keepalives, parse, Via stamping, automatic error answers.
    async fn deliver(self: &Arc<Self>, data: &[u8], source: Target) {
        match message::parse(data, &self.config.limits) {
            Ok(Message::Request(mut req)) => {
                stamp_via(&mut req.headers, &source);
                let _ = self
                    .incoming
                    .send(Incoming {
                        msg: Message::Request(req),
                        source,
                    })
                    .await;
            }
            Ok(msg @ Message::Response(_)) => {
                let _ = self.incoming.send(Incoming { msg, source }).await;
            }
            Err(err) => {
                tracing::debug!(%source, status = err.status, reason = %err.reason, "Unparsable message");
                let Some(mut headers) = err.answerable else {
                    return;
                };
                stamp_via(&mut headers, &source);
                let resp = message::make_response_from_headers(&headers, err.status, &err.reason);
                let target = message::top_via(&headers)
                    .map(|via| response_target(&via, &source))
                    .unwrap_or(source);
                let _ = self.send(&target, &Message::Response(resp)).await;
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

async fn bind_pair(addr: SocketAddr) -> io::Result<(UdpSocket, TcpListener)> {
    if addr.port() != 0 {
        let udp = UdpSocket::bind(addr).await?;
        let tcp = TcpListener::bind(addr).await?;
        return Ok((udp, tcp));
    }
    let mut last = None;
    for _ in 0..32 {
        let udp = UdpSocket::bind(addr).await?;
        let local = udp.local_addr()?;
        match TcpListener::bind(local).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::new(io::ErrorKind::AddrInUse, "no free port")))
}

/// Adds `received` (when the source IP differs from the Via host) and fills in `rport` (when the
/// client asked for it) in the top Via, as RFC 3261 §18.2.1 and RFC 3581 §4 say.
pub fn stamp_via(headers: &mut message::Headers, source: &Target) {
    let Some(idx) = headers
        .0
        .iter()
        .position(|h| h.name.eq_ignore_ascii_case("Via"))
    else {
        return;
    };
    let Ok(mut via) = message::Via::parse(&headers.0[idx].value) else {
        return;
    };
    let ip = source.addr.ip().to_string();
    let host = via.host.trim_start_matches('[').trim_end_matches(']');
    let rport_requested = via.rport().is_some();
    // A `received` the client wrote itself is never trusted: it is replaced by the real source.
    if host != ip || rport_requested || via.received().is_some() {
        via.set_param("received", Some(&ip));
    }
    if rport_requested {
        via.set_param("rport", Some(&source.addr.port().to_string()));
    }
    headers.0[idx].value = via.to_string();
}

/// Where a response to a request with this top Via goes (RFC 3261 §18.2.2, RFC 3581 §4): back on
/// the connection for TCP; otherwise to `received` (or the sent-by host when it is an IP literal)
/// at `rport`, else the sent-by port, else 5060, over the transport the request came on (a
/// datagram is never answered by opening a connection). Never a name to resolve: a non-IP
/// sent-by without `received` falls back to the packet's source.
pub fn response_target(via: &message::Via, source: &Target) -> Target {
    if via.transport.is_reliable() && source.transport.is_reliable() {
        return *source;
    }
    match via_target(via) {
        Some(mut t) => {
            if !source.transport.is_reliable() {
                t.transport = source.transport;
            }
            t
        }
        None => Target {
            conn: None,
            ..*source
        },
    }
}

/// The address a Via names for responses (received/rport, else sent-by), with its transport;
/// `None` when the host is a name (never resolved).
pub fn via_target(via: &message::Via) -> Option<Target> {
    let host = via
        .received()
        .unwrap_or(via.host.as_str())
        .trim_start_matches('[')
        .trim_end_matches(']');
    let ip = host.parse::<std::net::IpAddr>().ok()?;
    let port = match via.rport() {
        Some(Some(p)) => p,
        _ => via.port.unwrap_or(5060),
    };
    Some(Target {
        transport: via.transport,
        addr: SocketAddr::new(ip, port),
        conn: None,
    })
}

async fn udp_loop(weak: std::sync::Weak<SipTransport>, sock: Arc<UdpSocket>) {
    let mut buf = vec![0u8; 65_536];
    loop {
        let (n, peer) = match sock.recv_from(&mut buf).await {
            Ok(v) => v,
            Err(e) => {
                // ICMP port unreachable surfaces here on some systems; keep serving.
                tracing::trace!(error = %e, "UDP receive error");
                if weak.strong_count() == 0 {
                    return;
                }
                continue;
            }
        };
        let Some(t) = weak.upgrade() else { return };
        let data = &buf[..n];
        if data.iter().all(|b| *b == b'\r' || *b == b'\n') {
            // RFC 5626 keepalive: a double CRLF "ping" gets a single CRLF "pong".
            if data.len() >= 4 {
                let _ = sock.send_to(b"\r\n", peer).await;
            }
            continue;
        }
        t.deliver(data, Target::udp(peer)).await;
    }
}

async fn accept_loop(weak: std::sync::Weak<SipTransport>, listener: TcpListener) {
    loop {
        let accepted = listener.accept().await;
        let Some(t) = weak.upgrade() else { return };
        match accepted {
            Ok((stream, peer)) => {
                if lock(&t.conns).len() >= MAX_CONNECTIONS {
                    tracing::warn!(%peer, "Too many TCP connections; refusing one");
                    drop(stream);
                    continue;
                }
                t.start_conn(stream, peer);
            }
            Err(e) => {
                tracing::warn!(error = %e, "TCP accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

async fn conn_task(
    weak: std::sync::Weak<SipTransport>,
    stream: TcpStream,
    peer: SocketAddr,
    id: ConnId,
    mut out: mpsc::UnboundedReceiver<Vec<u8>>,
) {
    let (mut rd, mut wr) = stream.into_split();
    let (max, idle) = match weak.upgrade() {
        Some(t) => (t.config.max_tcp_message, t.config.tcp_idle),
        None => return,
    };
    let source = Target {
        transport: ViaTransport::Tcp,
        addr: peer,
        conn: Some(id),
    };
    let mut buf = BytesMut::with_capacity(4096);
    loop {
        tokio::select! {
            outgoing = out.recv() => {
                let Some(bytes) = outgoing else { break };
                // A peer that stops reading loses its connection instead of pinning it.
                match tokio::time::timeout(WRITE_TIMEOUT, wr.write_all(&bytes)).await {
                    Ok(Ok(())) => {}
                    _ => break,
                }
            }
            read = tokio::time::timeout(idle, rd.read_buf(&mut buf)) => {
                match read {
                    Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
                    Ok(Ok(_)) => {}
                }
                let Some(t) = weak.upgrade() else { break };
                if !drain_frames(&t, &mut buf, max, source, &mut wr).await {
                    break;
                }
            }
        }
    }
    if let Some(t) = weak.upgrade() {
        t.drop_conn(id);
    }
}

/// Delivers every whole message in `buf`; false when the stream must be closed.
async fn drain_frames(
    t: &Arc<SipTransport>,
    buf: &mut BytesMut,
    max: usize,
    source: Target,
    wr: &mut tokio::net::tcp::OwnedWriteHalf,
) -> bool {
    loop {
        match message::frame_stream(buf, max) {
            Frame::Incomplete => return true,
            Frame::Keepalive { len, ping } => {
                buf.advance(len);
                if ping && wr.write_all(b"\r\n").await.is_err() {
                    return false;
                }
            }
            Frame::Message(len) => {
                let frame = buf.split_to(len);
                t.deliver(&frame, source).await;
            }
            Frame::Invalid(err) => {
                tracing::debug!(%source, status = err.status, reason = %err.reason, "Closing unframeable TCP stream");
                return false;
            }
        }
    }
}
