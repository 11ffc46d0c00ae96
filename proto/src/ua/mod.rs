//! A user agent's endpoint (tokio): transactions driven over a [`SipTransport`].
//!
//! [`Endpoint::request`] runs one client transaction and streams its responses; received
//! requests arrive as [`ServerRequest`]s, each inside its own server transaction (retransmissions
//! are absorbed and answered there). ACKs for 2xx, which have no transaction, arrive as
//! `ServerRequest`s whose responses go nowhere.

pub mod credentials;
pub use credentials::Credentials;

use crate::sip::message::{self, Message, Method, Request, Response, Via};
use crate::sip::transaction::{ClientEvent, ClientTransaction, ServerTransaction, Timers, TxKey};
use crate::transport::{Incoming, SipTransport, Target, TransportConfig, response_target};
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::mpsc;

/// Boxed: a transaction's channel allocates its slots in blocks of 32, and a transaction lives
/// 64*T1 after its final response, so small slots keep an endpoint's memory low at high rates.
enum TxInput {
    Response(Box<Response>),
    Request(Box<Request>),
    Respond(Box<Response>),
}

/// A bound endpoint.
pub struct Endpoint {
    transport: Arc<SipTransport>,
    txs: Mutex<HashMap<TxKey, mpsc::UnboundedSender<TxInput>>>,
    timers: Timers,
    /// Final answers given with [`ServerRequest::respond`] and not sent yet (see
    /// [`Endpoint::settle`]).
    unsent: Arc<AtomicUsize>,
    /// The address to advertise in Via and Contact.
    pub advertised: SocketAddr,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("advertised", &self.advertised)
            .finish()
    }
}

/// A request received by the endpoint.
#[derive(Debug)]
pub struct ServerRequest {
    pub request: Request,
    pub source: Target,
    tx: Option<mpsc::UnboundedSender<TxInput>>,
    unsent: Arc<AtomicUsize>,
}

impl ServerRequest {
    /// Answers the request (several times for provisional then final responses).
    pub fn respond(&self, resp: Response) {
        if let Some(tx) = &self.tx {
            let last = resp.status >= 200;
            if last {
                self.unsent.fetch_add(1, Ordering::AcqRel);
            }
            if tx.send(TxInput::Respond(Box::new(resp))).is_err() && last {
                self.unsent.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }
}

/// Most transactions an endpoint keeps at once (each lives up to 64*T1 after its answer); a
/// request beyond it is answered 503 without a transaction.
pub const MAX_TRANSACTIONS: usize = 100_000;

use crate::clock::sleep_until;
use crate::sync::lock;

impl Endpoint {
    /// Binds UDP and TCP on `bind` and advertises `advertise` (or the bound address).
    pub async fn bind(
        bind: SocketAddr,
        advertise: Option<std::net::IpAddr>,
    ) -> io::Result<(Arc<Endpoint>, mpsc::UnboundedReceiver<ServerRequest>)> {
        let (transport, incoming) = SipTransport::bind(bind, TransportConfig::default()).await?;
        let local = transport.local_addr();
        let advertised = SocketAddr::new(advertise.unwrap_or(local.ip()), local.port());
        let ep = Arc::new(Endpoint {
            transport,
            txs: Mutex::new(HashMap::new()),
            timers: Timers::default(),
            unsent: Arc::new(AtomicUsize::new(0)),
            advertised,
        });
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(dispatch(Arc::downgrade(&ep), incoming, tx));
        Ok((ep, rx))
    }

    pub fn transport(&self) -> &Arc<SipTransport> {
        &self.transport
    }

    /// Waits (at most `max`) until every final answer given so far has been sent: a program
    /// that answers a BYE and exits at once would otherwise lose the 200 it just gave.
    pub async fn settle(&self, max: std::time::Duration) {
        let deadline = Instant::now() + max;
        while self.unsent.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
    }

    /// The top Via this endpoint puts on a request it sends over `transport`.
    pub fn via(&self, transport: message::Transport) -> Via {
        let mut via = Via::new(
            transport,
            &self.advertised.ip().to_string(),
            Some(self.advertised.port()),
            &message::new_branch(),
        );
        via.set_param("rport", None);
        via
    }

    /// Replaces the request's top Via with a fresh one of ours (new branch) for `transport`.
    pub fn with_via(&self, mut req: Request, transport: message::Transport) -> Request {
        req.headers.remove_first("Via");
        req.headers
            .push_front("Via", self.via(transport).to_string());
        req
    }

    /// Sends `req` as it is (it must carry our top Via, see [`Endpoint::with_via`]) in a client
    /// transaction; the responses come on the returned channel, which closes when the
    /// transaction ends.
    pub fn request(
        self: &Arc<Self>,
        req: Request,
        target: Target,
    ) -> mpsc::UnboundedReceiver<ClientEvent> {
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let (in_tx, mut in_rx) = mpsc::unbounded_channel();
        let mut ctx =
            ClientTransaction::new(req, target.is_reliable(), self.timers, Instant::now());
        let key = ctx.key().clone();
        lock(&self.txs).insert(key.clone(), in_tx);
        let ep = self.clone();
        tokio::spawn(async move {
            loop {
                while let Some(r) = ctx.poll_transmit() {
                    if ep
                        .transport
                        .send(&target, &Message::Request(r))
                        .await
                        .is_err()
                    {
                        ctx.handle_transport_error(Instant::now());
                    }
                }
                while let Some(ev) = ctx.poll_event() {
                    let _ = events_tx.send(ev);
                }
                if ctx.is_terminated() {
                    break;
                }
                let deadline = ctx.poll_timeout();
                tokio::select! {
                    input = in_rx.recv() => match input {
                        Some(TxInput::Response(r)) => ctx.handle_response(*r, Instant::now()),
                        Some(_) => {}
                        None => break,
                    },
                    _ = sleep_until(deadline) => ctx.handle_timeout(Instant::now()),
                }
            }
            lock(&ep.txs).remove(&key);
        });
        events_rx
    }

    /// Sends a request with no transaction (the ACK for a 2xx), with a fresh top Via.
    pub async fn send_stateless(&self, mut req: Request, target: Target) -> io::Result<()> {
        req.headers.remove_first("Via");
        req.headers
            .push_front("Via", self.via(target.transport).to_string());
        self.transport.send(&target, &Message::Request(req)).await
    }
}

async fn dispatch(
    weak: std::sync::Weak<Endpoint>,
    mut incoming: mpsc::Receiver<Incoming>,
    out: mpsc::UnboundedSender<ServerRequest>,
) {
    while let Some(Incoming { msg, source }) = incoming.recv().await {
        let Some(ep) = weak.upgrade() else { return };
        match msg {
            Message::Response(resp) => {
                let tx = TxKey::client(&resp).and_then(|k| lock(&ep.txs).get(&k).cloned());
                if let Some(tx) = tx {
                    let _ = tx.send(TxInput::Response(Box::new(resp)));
                }
            }
            Message::Request(req) => {
                let key = TxKey::server(&req);
                let existing = key.as_ref().and_then(|k| lock(&ep.txs).get(k).cloned());
                if let Some(tx) = existing {
                    let _ = tx.send(TxInput::Request(Box::new(req)));
                    continue;
                }
                if req.method == Method::Ack {
                    let _ = out.send(ServerRequest {
                        request: req,
                        source,
                        tx: None,
                        unsent: ep.unsent.clone(),
                    });
                    continue;
                }
                let full = lock(&ep.txs).len() >= MAX_TRANSACTIONS;
                let refusal = match &key {
                    None => Some((400, "Missing Via branch")),
                    Some(_) if full => Some((503, "Too many transactions")),
                    Some(_) => None,
                };
                let (Some(key), None) = (key, refusal) else {
                    let (status, reason) = refusal.unwrap_or((400, "Missing Via branch"));
                    let resp = message::make_response(&req, status, Some(reason), None);
                    let target = req
                        .top_via()
                        .map(|v| response_target(&v, &source))
                        .unwrap_or(source);
                    let _ = ep.transport.send(&target, &Message::Response(resp)).await;
                    continue;
                };
                let (in_tx, in_rx) = mpsc::unbounded_channel();
                lock(&ep.txs).insert(key.clone(), in_tx.clone());
                let upstream = req
                    .top_via()
                    .map(|v| response_target(&v, &source))
                    .unwrap_or(source);
                let stx = ServerTransaction::new(
                    req.clone(),
                    source.is_reliable(),
                    ep.timers,
                    Instant::now(),
                );
                tokio::spawn(run_server(ep.clone(), key, stx, upstream, in_rx));
                let _ = out.send(ServerRequest {
                    request: req,
                    source,
                    tx: Some(in_tx),
                    unsent: ep.unsent.clone(),
                });
            }
        }
    }
}

async fn run_server(
    ep: Arc<Endpoint>,
    key: TxKey,
    mut stx: ServerTransaction,
    upstream: Target,
    mut rx: mpsc::UnboundedReceiver<TxInput>,
) {
    // The user gets 64*T1 to send a first answer, and ten minutes (beyond a proxy's Timer C)
    // to send a final one after a provisional, before the transaction is given up.
    let started = Instant::now();
    // Final answers taken from the user and not yet sent (counted in `ep.unsent`).
    let mut owed = 0;
    loop {
        let give_up = if stx.last_response().is_none() {
            started + ep.timers.t1 * 64
        } else {
            started + std::time::Duration::from_secs(600)
        };
        while let Some(r) = stx.poll_transmit() {
            let _ = ep.transport.send(&upstream, &Message::Response(r)).await;
        }
        ep.unsent
            .fetch_sub(std::mem::take(&mut owed), Ordering::AcqRel);
        while stx.poll_event().is_some() {}
        if stx.is_terminated() {
            break;
        }
        let deadline = stx.poll_timeout().or(Some(give_up));
        tokio::select! {
            input = rx.recv() => match input {
                Some(TxInput::Request(r)) => stx.handle_request(*r, Instant::now()),
                Some(TxInput::Respond(r)) => {
                    owed += usize::from(r.status >= 200);
                    stx.send_response(*r, Instant::now());
                }
                Some(TxInput::Response(_)) => {}
                None => break,
            },
            _ = sleep_until(deadline) => {
                if stx.poll_timeout().is_none() && Instant::now() >= give_up {
                    break;
                }
                stx.handle_timeout(Instant::now());
            }
        }
    }
    lock(&ep.txs).remove(&key);
    // Answers that came too late for this transaction are not owed any more.
    rx.close();
    while let Ok(input) = rx.try_recv() {
        if let TxInput::Respond(r) = input {
            owed += usize::from(r.status >= 200);
        }
    }
    ep.unsent.fetch_sub(owed, Ordering::AcqRel);
}

/// The local address the system would use to reach `remote` (no packet is sent): what a user
/// agent advertises in Via and Contact when it binds a wildcard address.
/// The final response of a client transaction's events; `None` on timeout, transport error or
/// a transaction that ended without one.
pub async fn final_response(events: &mut mpsc::UnboundedReceiver<ClientEvent>) -> Option<Response> {
    while let Some(ev) = events.recv().await {
        match ev {
            ClientEvent::Final(r) => return Some(r),
            ClientEvent::Timeout | ClientEvent::TransportError => return None,
            ClientEvent::Provisional(_) | ClientEvent::Terminated => {}
        }
    }
    None
}

pub fn local_ip_towards(remote: SocketAddr) -> io::Result<std::net::IpAddr> {
    let any: SocketAddr = if remote.is_ipv4() {
        SocketAddr::from(([0, 0, 0, 0], 0))
    } else {
        SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0))
    };
    let sock = std::net::UdpSocket::bind(any)?;
    sock.connect(remote)?;
    Ok(sock.local_addr()?.ip())
}

/// Where a request to `uri` goes (an in-dialog request's next hop, [`crate::sip::dialog::Dialog::next_hop`]):
/// its IP literal and port (5060 by default), over the URI's `transport` parameter or `default`.
/// `None` for a host name: the endpoint never resolves names.
pub fn uri_target(uri: &message::Uri, default: message::Transport) -> Option<Target> {
    let host = uri.host.trim_start_matches('[').trim_end_matches(']');
    let ip: std::net::IpAddr = host.parse().ok()?;
    let transport = match uri.transport().as_deref() {
        Some(t) if t.eq_ignore_ascii_case("tcp") => message::Transport::Tcp,
        Some(t) if t.eq_ignore_ascii_case("udp") => message::Transport::Udp,
        _ => default,
    };
    Some(Target {
        transport,
        addr: SocketAddr::new(ip, uri.port.unwrap_or(5060)),
        conn: None,
    })
}

/// The expiry a registrar granted `contact` (as sent, with or without angle brackets) in its 2xx
/// to REGISTER: the `expires` parameter of the matching Contact, else the Expires header.
pub fn granted_expires(resp: &Response, contact: &str) -> Option<u32> {
    let ours = contact.trim().trim_start_matches('<');
    let ours = ours.split('>').next().unwrap_or(ours);
    let ours = message::Uri::parse(ours).ok();
    let from_contact = message::contacts(&resp.headers)
        .ok()
        .into_iter()
        .flatten()
        .find_map(|c| match &c {
            message::Contact::Addr(na) if Some(&na.uri) == ours.as_ref() => c.expires(),
            _ => None,
        });
    from_contact.or_else(|| resp.headers.get("Expires")?.trim().parse().ok())
}

/// One REGISTER of an address of record (RFC 3261 §10.2), as both agents send it.
#[derive(Debug, Clone)]
pub struct Register<'a> {
    /// The registrar's domain: the Request-URI is `sip:DOMAIN`.
    pub domain: &'a str,
    /// The address of record, `sip:USER@DOMAIN` (From and To).
    pub aor: &'a str,
    /// The From tag (one per registration, kept across refreshes).
    pub from_tag: &'a str,
    /// The Call-ID (one per registration, kept across refreshes).
    pub call_id: &'a str,
    pub seq: u32,
    /// The Contact header value to bind.
    pub contact: &'a str,
    /// Seconds asked for; 0 removes the binding (`;expires=0` on the Contact too).
    pub expires: u32,
    /// The sender's Via.
    pub via: String,
    pub user_agent: &'a str,
}

impl Register<'_> {
    /// The request; an error when the domain does not make a SIP URI.
    pub fn request(&self) -> Result<Request, message::ParseError> {
        let uri = message::Uri::parse(&format!("sip:{}", self.domain))?;
        let mut headers = message::Headers::default();
        headers.push("Via", self.via.as_str());
        headers.push("Max-Forwards", "70");
        headers.push("From", format!("<{}>;tag={}", self.aor, self.from_tag));
        headers.push("To", format!("<{}>", self.aor));
        headers.push("Call-ID", self.call_id);
        headers.push("CSeq", format!("{} REGISTER", self.seq));
        if self.expires == 0 {
            headers.push("Contact", format!("{};expires=0", self.contact));
        } else {
            headers.push("Contact", self.contact);
        }
        headers.push("Expires", self.expires.to_string());
        headers.push("User-Agent", self.user_agent);
        Ok(Request {
            method: Method::Register,
            uri,
            headers,
            body: Default::default(),
        })
    }
}

/// When to refresh a registration granted for `granted` seconds: at 90 %, at least 1 s later.
pub fn refresh_after(granted: u32) -> std::time::Duration {
    std::time::Duration::from_millis(u64::from(granted) * 900)
        .max(std::time::Duration::from_secs(1))
}

#[cfg(test)]
mod helper_tests {
    use super::*;

    #[test]
    fn a_register_binds_its_contact_and_an_unregister_asks_for_expires_0() {
        let mut reg = Register {
            domain: "relay.test",
            aor: "sip:wine@relay.test",
            from_tag: "f1",
            call_id: "c1",
            seq: 3,
            contact: "<sip:wine@127.0.0.1:5090>",
            expires: 300,
            via: "SIP/2.0/UDP 127.0.0.1:5090;branch=z9hG4bKx;rport".into(),
            user_agent: "test",
        };
        let req = reg.request().unwrap();
        assert_eq!(req.uri.to_string(), "sip:relay.test");
        assert_eq!(req.headers.get("To"), Some("<sip:wine@relay.test>"));
        assert_eq!(
            req.headers.get("From"),
            Some("<sip:wine@relay.test>;tag=f1")
        );
        assert_eq!(req.headers.get("CSeq"), Some("3 REGISTER"));
        assert_eq!(
            req.headers.get("Contact"),
            Some("<sip:wine@127.0.0.1:5090>")
        );
        assert_eq!(req.headers.get("Expires"), Some("300"));
        reg.expires = 0;
        let req = reg.request().unwrap();
        assert_eq!(
            req.headers.get("Contact"),
            Some("<sip:wine@127.0.0.1:5090>;expires=0")
        );
        assert_eq!(req.headers.get("Expires"), Some("0"));
        reg.domain = "bad domain";
        assert!(
            reg.request().is_err(),
            "a domain that makes no URI is an error"
        );
    }

    #[test]
    fn registrations_are_refreshed_at_90_percent() {
        assert_eq!(refresh_after(300), std::time::Duration::from_secs(270));
        assert_eq!(refresh_after(0), std::time::Duration::from_secs(1));
    }

    #[test]
    fn uri_targets_need_ip_literals() {
        let uri = message::Uri::parse("sip:127.0.0.1:5070;lr;transport=tcp").unwrap();
        let t = uri_target(&uri, message::Transport::Udp).unwrap();
        assert_eq!(t, Target::tcp("127.0.0.1:5070".parse().unwrap()));
        let uri = message::Uri::parse("sip:[::1];lr").unwrap();
        let t = uri_target(&uri, message::Transport::Udp).unwrap();
        assert_eq!(t, Target::udp("[::1]:5060".parse().unwrap()));
        let uri = message::Uri::parse("sip:relay.example.com;lr").unwrap();
        assert!(uri_target(&uri, message::Transport::Udp).is_none());
    }

    #[test]
    fn granted_expiry_comes_from_our_contact() {
        let mut resp = Response::new(200);
        resp.headers
            .push("Contact", "<sip:wine@10.0.0.1:5070>;expires=120");
        resp.headers
            .push("Contact", "<sip:wine@10.0.0.2:5070>;expires=3000");
        resp.headers.push("Expires", "99");
        assert_eq!(
            granted_expires(&resp, "<sip:wine@10.0.0.2:5070>"),
            Some(3000)
        );
        assert_eq!(granted_expires(&resp, "sip:wine@10.0.0.1:5070"), Some(120));
        assert_eq!(granted_expires(&resp, "<sip:beer@10.0.0.1:5070>"), Some(99));
    }
}
