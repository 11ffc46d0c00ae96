//! SIP over UDP and TCP on one address (tokio). The only code in `proto` that owns sockets.
//!
//! The transport parses each datagram or stream frame once, stamps `received`/`rport` into the top
//! Via of requests (RFC 3261 §18.2.1, RFC 3581), answers requests it cannot parse with the status
//! the parser chose (400, 501, 505, …) and drops responses it cannot parse. Everything else goes to
//! the user as [`Incoming`] over one channel. Responses go back per Via ([`response_target`]), on
//! the same TCP connection a request came on while it is open. CRLF keepalives are answered as
//! RFC 5626 §4.4.1 says (a double CRLF gets a single CRLF back; on UDP a double CRLF is a STUN-less
//! ping and also gets CRLF) and never reach the user.

pub mod limit;

use crate::sip::message::{self, Frame, Limits, Message, Transport as ViaTransport};
use bytes::{Buf, BytesMut};
use limit::{Gate, LogGate, SourceLimiter, SourceLimits, Verdict};
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::mpsc;

/// How long writing one message to a TCP peer may take before the connection is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Messages waiting to be written to one TCP connection; a peer that reads slower than this
/// loses messages (the sender sees an error), never the relay's memory.
const MAX_QUEUED_WRITES: usize = 1024;

/// How long opening a TCP connection may take before the send fails.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

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
#[derive(Debug, Clone)]
pub struct TransportConfig {
    /// Largest message accepted on a TCP connection.
    pub max_tcp_message: usize,
    /// Caps for every message (a UDP datagram is at most 65,535 bytes whatever this says).
    pub limits: Limits,
    /// An accepted TCP connection that carries no registration ([`SipTransport::hold`]) and no
    /// dialog ([`SipTransport::pin`]) is closed after this long without a whole message.
    /// Connections this side opened stay until the peer closes them.
    pub tcp_idle: Duration,
    /// An accepted TCP connection must deliver its first whole message within this time.
    pub tcp_first_message: Duration,
    /// Most TCP connections open at once; further ones are refused at accept.
    pub max_connections: usize,
    /// Most accepted TCP connections from one IP address (trusted networks exempt).
    pub tcp_per_source: usize,
    /// The per-source message limit (off with a rate of 0, the default for user agents).
    pub sources: SourceLimits,
    /// Log every message received and sent, whole (a SIP trace), at info level under the
    /// target `sip_trace`.
    pub trace: bool,
    /// The UDP socket's receive buffer to ask for, in bytes (0: the system's default). The
    /// system grants at most `net.core.rmem_max`: [`SipTransport::udp_receive_buffer`] says
    /// what it got.
    pub udp_receive_buffer: usize,
}

impl Default for TransportConfig {
    fn default() -> Self {
        TransportConfig {
            max_tcp_message: 65_535,
            limits: Limits::UDP,
            tcp_idle: Duration::from_secs(600),
            tcp_first_message: Duration::from_secs(10),
            max_connections: 10_000,
            tcp_per_source: usize::MAX,
            udp_receive_buffer: 0,
            sources: SourceLimits {
                rate_per_sec: 0,
                ..SourceLimits::default()
            },
            trace: false,
        }
    }
}

struct Conn {
    peer: SocketAddr,
    /// Accepted (the peer connected), as opposed to opened by this side.
    inbound: bool,
    tx: mpsc::Sender<Vec<u8>>,
    keep: Arc<Keep>,
}

/// What keeps an accepted connection open beyond its idle deadline.
#[derive(Debug, Default)]
struct Keep {
    /// A registration made over it lasts until then.
    until: Mutex<Option<Instant>>,
    /// Dialogs that reach a party over it.
    pins: AtomicU32,
}

impl Keep {
    /// When the connection may be closed for idleness at the earliest (`None`: not while
    /// pinned).
    fn held_until(&self) -> Option<Option<Instant>> {
        if self.pins.load(Ordering::Relaxed) > 0 {
            return None;
        }
        Some(*lock(&self.until))
    }
}

/// UDP and TCP sockets bound to one address.
pub struct SipTransport {
    udp: Arc<UdpSocket>,
    local: SocketAddr,
    conns: Mutex<HashMap<ConnId, Conn>>,
    by_peer: Mutex<HashMap<SocketAddr, ConnId>>,
    /// Accepted connections per source IP.
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    next_conn: AtomicU64,
    incoming: mpsc::Sender<Incoming>,
    config: TransportConfig,
    limiter: Mutex<SourceLimiter>,
    log_gate: Mutex<LogGate>,
    /// Messages dropped so far because their source was over its rate.
    dropped: AtomicU64,
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
        if config.udp_receive_buffer > 0 {
            // The system caps it (net.core.rmem_max); what it granted is read back below.
            let _ =
                rustix::net::sockopt::set_socket_recv_buffer_size(&udp, config.udp_receive_buffer);
        }
        let local = udp.local_addr()?;
        let (tx, rx) = mpsc::channel(8192);
        let transport = Arc::new(SipTransport {
            udp: Arc::new(udp),
            local,
            conns: Mutex::new(HashMap::new()),
            by_peer: Mutex::new(HashMap::new()),
            per_ip: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(1),
            incoming: tx,
            limiter: Mutex::new(SourceLimiter::new(config.sources.clone())),
            log_gate: Mutex::new(LogGate::new(5, Duration::from_secs(10), 4096)),
            dropped: AtomicU64::new(0),
            config,
        });
        tokio::spawn(udp_loop(Arc::downgrade(&transport), transport.udp.clone()));
        tokio::spawn(accept_loop(Arc::downgrade(&transport), listener));
        Ok((transport, rx))
    }

    /// The UDP socket's receive buffer in bytes, as the system reports it (Linux counts its own
    /// bookkeeping too: twice what was granted).
    pub fn udp_receive_buffer(&self) -> Option<usize> {
        rustix::net::sockopt::socket_recv_buffer_size(&*self.udp).ok()
    }

    /// The bound address (UDP and TCP share it).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Sends a message. Over TCP with a connection named (`target.conn`), only that
    /// connection (or another open one from the same peer address) is used: a party reached
    /// over the connection it opened is never reached by a new one. Without one, an open
    /// connection to the address is used, else one is opened.
    pub async fn send(self: &Arc<Self>, target: &Target, msg: &Message) -> io::Result<()> {
        let bytes = message::serialize(msg);
        self.send_bytes(target, bytes).await
    }

    /// Sends raw bytes (already serialised).
    pub async fn send_bytes(self: &Arc<Self>, target: &Target, bytes: Vec<u8>) -> io::Result<()> {
        if self.config.trace {
            trace_message("sent to", target, &bytes);
        }
        match target.transport {
            ViaTransport::Udp => {
                self.udp.send_to(&bytes, target.addr).await?;
                Ok(())
            }
            ViaTransport::Tcp => {
                if let Some(tx) = self.open_conn(target) {
                    return tx.try_send(bytes).map_err(|e| match e {
                        mpsc::error::TrySendError::Full(_) => io::Error::new(
                            io::ErrorKind::WouldBlock,
                            "the peer does not read: its connection's queue is full",
                        ),
                        mpsc::error::TrySendError::Closed(_) => {
                            io::Error::new(io::ErrorKind::BrokenPipe, "connection closed")
                        }
                    });
                }
                if target.conn.is_some() {
                    return Err(io::Error::new(
                        io::ErrorKind::NotConnected,
                        "the connection to this party is closed",
                    ));
                }
                let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target.addr))
                    .await
                    .map_err(|_| {
                        io::Error::new(io::ErrorKind::TimedOut, "TCP connect timed out")
                    })??;
                let tx = self.start_conn(stream, target.addr, false);
                tx.try_send(bytes)
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
        self.connection_to(peer).is_some()
    }

    /// The open TCP connection with this peer, if any.
    pub fn connection_to(&self, peer: SocketAddr) -> Option<ConnId> {
        let id = lock(&self.by_peer).get(&peer).copied()?;
        lock(&self.conns).contains_key(&id).then_some(id)
    }

    /// Number of TCP connections open now.
    pub fn connections(&self) -> usize {
        lock(&self.conns).len()
    }

    /// Keeps an accepted connection open at least until `until` (a registration made over it),
    /// whatever its idle deadline says.
    pub fn hold(&self, conn: ConnId, until: Instant) {
        if let Some(c) = lock(&self.conns).get(&conn) {
            let mut u = lock(&c.keep.until);
            *u = Some(u.map_or(until, |x| x.max(until)));
        }
    }

    /// Keeps a connection open while a dialog reaches a party over it; [`SipTransport::unpin`]
    /// when the dialog ends.
    pub fn pin(&self, conn: ConnId) {
        if let Some(c) = lock(&self.conns).get(&conn) {
            c.keep.pins.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn unpin(&self, conn: ConnId) {
        if let Some(c) = lock(&self.conns).get(&conn) {
            let _ = c
                .keep
                .pins
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
        }
    }

    /// Whether a message from `ip` may be handled now (the per-source limit); logs drops at
    /// most once per interval per source.
    fn admit(&self, ip: IpAddr) -> bool {
        let verdict = lock(&self.limiter).check(ip, Instant::now());
        match verdict {
            Verdict::Pass => true,
            Verdict::Drop { log } => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                if let Some(n) = log {
                    tracing::warn!(source = %ip, dropped = n, "Source over its message rate: dropping its messages");
                }
                false
            }
        }
    }

    /// Messages dropped since the start because their source was over its rate.
    pub fn dropped_total(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Whether a log line caused by `ip` may be written now (a few per source per interval).
    pub fn admit_log(&self, ip: IpAddr) -> bool {
        match lock(&self.log_gate).check(ip, Instant::now()) {
            Gate::Write { held: 0 } => true,
            Gate::Write { held } => {
                tracing::info!(source = %ip, held, "Log lines caused by this source were held back");
                true
            }
            Gate::Hold => false,
        }
    }

    fn open_conn(&self, target: &Target) -> Option<mpsc::Sender<Vec<u8>>> {
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
        inbound: bool,
    ) -> mpsc::Sender<Vec<u8>> {
        let id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(MAX_QUEUED_WRITES);
        let keep = Arc::new(Keep::default());
        lock(&self.conns).insert(
            id,
            Conn {
                peer,
                inbound,
                tx: tx.clone(),
                keep: keep.clone(),
            },
        );
        lock(&self.by_peer).insert(peer, id);
        if inbound {
            *lock(&self.per_ip).entry(peer.ip()).or_insert(0) += 1;
        }
        let _ = stream.set_nodelay(true);
        tokio::spawn(conn_task(
            Arc::downgrade(self),
            stream,
            ConnInfo {
                peer,
                id,
                inbound,
                keep,
            },
            rx,
        ));
        tx
    }

    fn drop_conn(&self, id: ConnId) {
        if let Some(c) = lock(&self.conns).remove(&id) {
            let mut by_peer = lock(&self.by_peer);
            if by_peer.get(&c.peer) == Some(&id) {
                by_peer.remove(&c.peer);
            }
            if c.inbound {
                let mut per_ip = lock(&self.per_ip);
                if let Some(n) = per_ip.get_mut(&c.peer.ip()) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        per_ip.remove(&c.peer.ip());
                    }
                }
            }
        }
    }

    /// Whether a new connection from `peer` may be accepted: under the total cap, and under the
    /// per-source cap unless the source is trusted.
    fn may_accept(&self, peer: SocketAddr) -> Result<(), &'static str> {
        if lock(&self.conns).len() >= self.config.max_connections {
            return Err("too many TCP connections");
        }
        let trusted = lock(&self.limiter).is_trusted(peer.ip());
        let from_peer = lock(&self.per_ip).get(&peer.ip()).copied().unwrap_or(0);
        if !trusted && from_peer >= self.config.tcp_per_source {
            return Err("too many TCP connections from this source");
        }
        Ok(())
    }

    /// Handles `data` as if it had just arrived from `source` over UDP, past the per-source
    /// limit: parsed, stamped and handed on (or answered when unparsable), exactly as the
    /// socket's own datagrams are. For fuzzing the whole receive path without a socket.
    pub async fn receive(self: &Arc<Self>, data: &[u8], source: Target) {
        if data.iter().all(|b| *b == b'\r' || *b == b'\n') {
            return;
        }
        self.deliver(data, source).await;
    }

    /// Handles one received message: keepalives, parse, Via stamping, automatic error answers.
    /// Whether input is waiting unprocessed: datagrams in the UDP socket's receive queue not
    /// yet read, or messages parsed and not yet taken from [`Incoming`]. A program that could not
    /// run for a while (CPU starvation, a pause) asks this before it acts on a retransmission
    /// timer, so that an answer already received is seen first.
    pub fn input_waiting(&self) -> bool {
        let queued = self.incoming.max_capacity() - self.incoming.capacity();
        queued > 0 || rustix::io::ioctl_fionread(&*self.udp).is_ok_and(|n| n > 0)
    }

    async fn deliver(self: &Arc<Self>, data: &[u8], source: Target) {
        if self.config.trace {
            trace_message("received from", &source, data);
        }
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
                if self.admit_log(source.addr.ip()) {
                    tracing::debug!(%source, status = err.status, reason = %crate::log::Esc(&err.reason), "Unparsable message");
                }
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

/// One SIP trace entry: the direction, the peer and the whole message, each of its lines
/// indented and with control characters escaped (so no line of it can pass for a log line).
fn trace_message(direction: &str, peer: &Target, data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut body = String::with_capacity(text.len() + 64);
    for line in text.split("\r\n") {
        body.push_str("\n    ");
        body.push_str(&crate::log::Esc(line).to_string());
    }
    tracing::info!(target: "sip_trace", "{direction} {peer} ({} bytes):{body}", data.len());
}

use crate::sync::lock;

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
        if !t.admit(peer.ip()) {
            continue;
        }
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
                if let Err(why) = t.may_accept(peer) {
                    if t.admit_log(peer.ip()) {
                        tracing::warn!(source = %peer.ip(), "Refusing a TCP connection: {why}");
                    }
                    drop(stream);
                    continue;
                }
                t.start_conn(stream, peer, true);
            }
            Err(e) => {
                tracing::warn!(error = %e, "TCP accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

struct ConnInfo {
    peer: SocketAddr,
    id: ConnId,
    inbound: bool,
    keep: Arc<Keep>,
}

async fn conn_task(
    weak: std::sync::Weak<SipTransport>,
    stream: TcpStream,
    info: ConnInfo,
    mut out: mpsc::Receiver<Vec<u8>>,
) {
    let (mut rd, mut wr) = stream.into_split();
    let (max, idle, first) = match weak.upgrade() {
        Some(t) => (
            t.config.max_tcp_message,
            t.config.tcp_idle,
            t.config.tcp_first_message,
        ),
        None => return,
    };
    let source = Target {
        transport: ViaTransport::Tcp,
        addr: info.peer,
        conn: Some(info.id),
    };
    let mut buf = BytesMut::with_capacity(4096);
    // An accepted connection must bring a whole message soon, then one at least every `idle`
    // unless a registration or a dialog holds it; one this side opened stays until closed.
    let mut got_message = false;
    let mut deadline = info.inbound.then(|| Instant::now() + first);
    loop {
        let sleep = crate::clock::sleep_until(deadline);
        tokio::select! {
            outgoing = out.recv() => {
                let Some(bytes) = outgoing else { break };
                // A peer that stops reading loses its connection instead of pinning it.
                match tokio::time::timeout(WRITE_TIMEOUT, wr.write_all(&bytes)).await {
                    Ok(Ok(())) => {}
                    _ => break,
                }
            }
            read = rd.read_buf(&mut buf) => {
                match read {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                let Some(t) = weak.upgrade() else { break };
                match drain_frames(&t, &mut buf, max, source, &mut wr).await {
                    Drained::Close => break,
                    Drained::Messages(0) => {}
                    Drained::Messages(_) => {
                        got_message = true;
                        if info.inbound {
                            deadline = Some(Instant::now() + idle);
                        }
                    }
                }
            }
            _ = sleep => {
                if !got_message {
                    tracing::debug!(peer = %info.peer, "TCP connection sent no whole message in time: closing it");
                    break;
                }
                let now = Instant::now();
                match info.keep.held_until() {
                    // A dialog uses it: look again later.
                    None => deadline = Some(now + idle),
                    Some(Some(until)) if until > now => deadline = Some(until.max(now + idle)),
                    Some(_) => {
                        tracing::debug!(peer = %info.peer, "Idle TCP connection without a registration: closing it");
                        break;
                    }
                }
            }
        }
    }
    if let Some(t) = weak.upgrade() {
        t.drop_conn(info.id);
    }
}

enum Drained {
    /// The stream is unusable: close it.
    Close,
    /// This many whole messages (or keepalives) were read.
    Messages(usize),
}

/// Delivers every whole message in `buf` (those over the source's rate are dropped).
async fn drain_frames(
    t: &Arc<SipTransport>,
    buf: &mut BytesMut,
    max: usize,
    source: Target,
    wr: &mut tokio::net::tcp::OwnedWriteHalf,
) -> Drained {
    let mut n = 0;
    loop {
        match message::frame_stream(buf, max) {
            Frame::Incomplete => return Drained::Messages(n),
            Frame::Keepalive { len, ping } => {
                buf.advance(len);
                n += 1;
                if ping && wr.write_all(b"\r\n").await.is_err() {
                    return Drained::Close;
                }
            }
            Frame::Message(len) => {
                let frame = buf.split_to(len);
                n += 1;
                if t.admit(source.addr.ip()) {
                    t.deliver(&frame, source).await;
                }
            }
            Frame::Invalid(err) => {
                tracing::debug!(%source, status = err.status, reason = %crate::log::Esc(&err.reason), "Closing unframeable TCP stream");
                return Drained::Close;
            }
        }
    }
}
