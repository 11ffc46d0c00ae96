//! Registration of each service with the relay: `REGISTER sip:SERVICE@DOMAIN` with the agent's
//! SIP address as Contact, digest authentication as the account (MD5 or SHA-256, qop=auth), one
//! Call-ID per service, refreshed at 90 % of the granted expiry, removed (expires=0) at stop.
//!
//! Remembers the realm the relay challenged with (the assertion key derives from it). Does not
//! decide anything about sessions, and never logs the password.

use crate::output::{Event, Output};
use proto::sip::message::{self, Request, Response, Transport};
use proto::sip::transaction::ClientEvent;
use proto::transport::Target;
use proto::ua::{self, Credentials, Endpoint};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// The account's registrations with one relay.
pub(crate) struct Registrar {
    ep: Arc<Endpoint>,
    relay: Target,
    /// The account's credentials, answered only in the relay's realm.
    creds: Credentials,
    domain: String,
    expires: u32,
}

/// One service's registration: its Call-ID and CSeq (kept by the task that refreshes it).
#[derive(Debug)]
pub(crate) struct Binding {
    pub(crate) service: String,
    call_id: String,
    from_tag: String,
    seq: u32,
}

impl Binding {
    pub(crate) fn new(service: &str) -> Binding {
        Binding {
            service: service.to_string(),
            call_id: message::new_call_id(),
            from_tag: message::new_tag(),
            seq: 0,
        }
    }
}

/// Why a REGISTER did not succeed.
#[derive(Debug)]
pub(crate) enum RegisterError {
    /// The relay still answered 401/407 to our credentials.
    Unauthorized(Response),
    /// Another final answer.
    Refused(Response),
    /// No answer, or the relay could not be reached.
    NoAnswer(String),
}

impl RegisterError {
    /// The problem in words, naming the service.
    pub(crate) fn describe(&self, service: &str) -> String {
        match self {
            RegisterError::Unauthorized(r) => format!(
                "the relay refused the account's credentials ({})",
                status_text(r)
            ),
            RegisterError::Refused(r) => format!(
                "the relay refused to register service '{service}': {}",
                status_text(r)
            ),
            RegisterError::NoAnswer(why) => format!("REGISTER for service '{service}': {why}"),
        }
    }
}

/// `403 Forbidden (Registering another user is not allowed)`, or `404 Not Found`.
fn status_text(r: &Response) -> String {
    let standard = message::reason_phrase(r.status);
    if r.reason.is_empty() || r.reason.eq_ignore_ascii_case(standard) {
        format!("{} {standard}", r.status)
    } else {
        format!("{} {standard} ({})", r.status, r.reason)
    }
}

impl Registrar {
    pub(crate) fn new(
        ep: Arc<Endpoint>,
        relay: Target,
        creds: Credentials,
        domain: &str,
        expires: u32,
    ) -> Registrar {
        Registrar {
            ep,
            relay,
            creds,
            domain: domain.to_string(),
            expires,
        }
    }

    /// The relay's realm: `--domain`, else that of its first challenge (if it challenged).
    pub(crate) fn realm(&self) -> Option<String> {
        self.creds.realm()
    }

    /// The Contact of a service: `<sip:SERVICE@IP:PORT>` (with `;transport=tcp` over TCP).
    pub(crate) fn contact(&self, service: &str) -> String {
        contact(&self.ep, service, self.relay.transport)
    }

    /// Registers (or with `expires` 0 unregisters) a service; returns the granted expiry.
    pub(crate) async fn register(
        &self,
        b: &mut Binding,
        expires: u32,
    ) -> Result<u32, RegisterError> {
        let mut expires = expires;
        let mut retried_interval = false;
        loop {
            b.seq += 1;
            let req = self.request(b, expires)?;
            let resp = self.send(req, &mut b.seq).await?;
            match resp.status {
                200..=299 => {
                    if expires == 0 {
                        return Ok(0);
                    }
                    let contact = self.contact(&b.service);
                    return Ok(ua::granted_expires(&resp, &contact).unwrap_or(expires));
                }
                // Interval Too Brief: ask again once with the smallest expiry allowed.
                423 if !retried_interval && expires != 0 => {
                    let min = resp
                        .headers
                        .get("Min-Expires")
                        .and_then(|v| v.trim().parse::<u32>().ok());
                    match min {
                        Some(min) if min > expires => {
                            retried_interval = true;
                            expires = min;
                        }
                        _ => return Err(RegisterError::Refused(resp)),
                    }
                }
                401 | 407 => return Err(RegisterError::Unauthorized(resp)),
                _ => return Err(RegisterError::Refused(resp)),
            }
        }
    }

    fn request(&self, b: &Binding, expires: u32) -> Result<Request, RegisterError> {
        let aor = format!("sip:{}@{}", b.service, self.domain);
        let contact = self.contact(&b.service);
        proto::ua::Register {
            domain: &self.domain,
            aor: &aor,
            from_tag: &b.from_tag,
            call_id: &b.call_id,
            seq: b.seq,
            contact: &contact,
            expires,
            via: self.ep.via(self.relay.transport).to_string(),
            user_agent: crate::USER_AGENT,
        }
        .request()
        .map_err(|e| {
            RegisterError::NoAnswer(format!(
                "bad registrar URI sip:{}: {}",
                self.domain, e.reason
            ))
        })
    }

    /// Sends the request, answering the relay's challenge (and one `stale=true` re-challenge).
    async fn send(&self, mut req: Request, seq: &mut u32) -> Result<Response, RegisterError> {
        let mut answered = 0;
        loop {
            let resp = self.transact(req.clone()).await?;
            if !matches!(resp.status, 401 | 407)
                || !self.creds.answer(&mut req, &resp, &mut answered)
            {
                return Ok(resp);
            }
            if let Ok(cseq) = req.cseq() {
                *seq = cseq.seq;
            }
            req = self.ep.with_via(req, self.relay.transport);
        }
    }

    /// One client transaction with the relay: its final response.
    async fn transact(&self, req: Request) -> Result<Response, RegisterError> {
        let mut events = self.ep.request(req, self.relay);
        loop {
            match events.recv().await {
                Some(ClientEvent::Final(r)) => return Ok(r),
                Some(ClientEvent::Timeout) => {
                    return Err(RegisterError::NoAnswer(format!(
                        "no answer from the relay at {}",
                        self.relay.addr
                    )));
                }
                Some(ClientEvent::TransportError) => {
                    return Err(RegisterError::NoAnswer(format!(
                        "cannot reach the relay at {} over {}",
                        self.relay.addr, self.relay.transport
                    )));
                }
                Some(_) => {}
                None => {
                    return Err(RegisterError::NoAnswer(
                        "the transaction ended without an answer".into(),
                    ));
                }
            }
        }
    }
}

/// The Contact of a service on this endpoint.
pub(crate) fn contact(ep: &Endpoint, service: &str, transport: Transport) -> String {
    let a = ep.advertised;
    let host = if a.is_ipv6() {
        format!("[{}]", a.ip())
    } else {
        a.ip().to_string()
    };
    let t = if transport == Transport::Tcp {
        ";transport=tcp"
    } else {
        ""
    };
    format!("<sip:{service}@{host}:{}{t}>", a.port())
}

/// How long the first REGISTER of a service waits for an answer before it is tried again.
pub(crate) const FIRST_PATIENCE: Duration = Duration::from_secs(5);

/// The waits between first registrations that got no answer: 1, 2, 4, … up to 30 s.
pub(crate) fn backoff(attempt: u32) -> Duration {
    Duration::from_secs(1u64.checked_shl(attempt).unwrap_or(u64::MAX).min(30))
}

/// Resolves once `stop` turns true (or its sender is gone).
pub(crate) async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Keeps one service registered until `stop`, then unregisters it.
pub(crate) async fn keep_registered(
    reg: Arc<Registrar>,
    mut b: Binding,
    granted: u32,
    out: Output,
    mut stop: watch::Receiver<bool>,
) {
    let mut wait = ua::refresh_after(granted);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = stopped(&mut stop) => break,
            _ = tokio::time::sleep(wait) => {}
        }
        match reg.register(&mut b, reg.expires).await {
            Ok(granted) => {
                out.emit(Event::Reregistered {
                    service: b.service.clone(),
                    expires: granted,
                    recovered: failing,
                });
                failing = false;
                wait = ua::refresh_after(granted);
            }
            Err(e) => {
                let message = e.describe(&b.service);
                tracing::warn!(service = %b.service, %message, "Refreshing the registration failed");
                out.emit(Event::RegistrationFailed {
                    service: b.service.clone(),
                    message,
                });
                failing = true;
                wait = Duration::from_secs(10);
            }
        }
    }
    match reg.register(&mut b, 0).await {
        Ok(_) => out.emit(Event::Unregistered {
            service: b.service.clone(),
        }),
        Err(e) => {
            tracing::warn!(service = %b.service, problem = %e.describe(&b.service), "Unregistering failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_tries_back_off() {
        let waits: Vec<u64> = (0..8).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(backoff(200), Duration::from_secs(30));
    }

    #[test]
    fn refusals_name_the_service_and_status() {
        let mut r = Response::new(403);
        r.reason = "Registering another user is not allowed".into();
        assert_eq!(
            RegisterError::Refused(r).describe("beer"),
            "the relay refused to register service 'beer': 403 Forbidden (Registering another user is not allowed)"
        );
        assert_eq!(
            RegisterError::Unauthorized(Response::new(401)).describe("beer"),
            "the relay refused the account's credentials (401 Unauthorized)"
        );
    }
}
