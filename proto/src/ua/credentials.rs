//! The digest client of a user agent (RFC 3261 §22, RFC 7616/8760): a user's or a server
//! account's credentials, given only to its relay.
//!
//! It answers a 401 to a REGISTER (the relay as registrar) or a 407 to any other request (the
//! relay as proxy), and only in the relay's realm: the one configured, or else the realm of the
//! first challenge to a request sent without credentials (learnt then). A challenge from any
//! other realm, or a 401 to an INVITE, comes from beyond the relay and gets nothing. Of the
//! challenges in that realm it answers the strongest algorithm it supports (SHA-256 before
//! MD5); a request is answered once, and once more only when the relay says its nonce was
//! stale (`stale=true`).
use std::sync::Mutex;

use crate::sip::digest::{self, Algorithm, Challenge, ClientNonces};
use crate::sip::message::{Method, Request, Response};
use crate::sync::lock;

/// A user name and password for one relay.
#[derive(Debug)]
pub struct Credentials {
    user: String,
    password: String,
    realm: Mutex<Option<String>>,
    nonces: ClientNonces,
}

impl Credentials {
    /// `realm`: the relay's realm (its domain), if known; else learnt from its first challenge.
    pub fn new(user: &str, password: &str, realm: Option<String>) -> Credentials {
        Credentials {
            user: user.to_owned(),
            password: password.to_owned(),
            realm: Mutex::new(realm),
            nonces: ClientNonces::default(),
        }
    }

    pub fn user(&self) -> &str {
        &self.user
    }

    /// The relay's realm: configured, or learnt from its first challenge.
    pub fn realm(&self) -> Option<String> {
        lock(&self.realm).clone()
    }

    /// The relay's challenge in `resp` to `req`, if it holds one this client answers.
    pub fn challenge(&self, req: &Request, resp: &Response) -> Option<Challenge> {
        let header = match (req.method, resp.status) {
            (Method::Register, 401) => "WWW-Authenticate",
            (m, 407) if m != Method::Register => "Proxy-Authenticate",
            _ => return None,
        };
        let mut realm = lock(&self.realm);
        let had_credentials =
            req.headers.contains("Authorization") || req.headers.contains("Proxy-Authorization");
        let offered: Vec<Challenge> = resp
            .headers
            .get_all(header)
            .filter_map(|v| Challenge::parse(v).ok())
            .filter(|c| match realm.as_deref() {
                Some(r) => c.realm == r,
                // Not known yet: the answer to a request without credentials is the relay's.
                None => !had_credentials,
            })
            .collect();
        let chosen = offered
            .iter()
            .find(|c| c.algorithm == Algorithm::Sha256)
            .or_else(|| offered.first())?
            .clone();
        if realm.is_none() {
            *realm = Some(chosen.realm.clone());
        }
        Some(chosen)
    }

    /// Whether a request whose challenges were answered `answered` times answers `ch`: the
    /// first time, and a second time only for a stale nonce.
    pub fn answers(ch: &Challenge, answered: u32) -> bool {
        answered == 0 || (answered == 1 && ch.stale)
    }

    /// Puts the credentials answering `ch` (from a response with `status`) into `req`,
    /// replacing any earlier ones, and raises its CSeq by one. The request is a new
    /// transaction: the caller gives it a new Via.
    pub fn authorize(&self, req: &mut Request, status: u16, ch: &Challenge) {
        let header = if status == 401 {
            "Authorization"
        } else {
            "Proxy-Authorization"
        };
        let (nc, cnonce) = self.nonces.next(&ch.nonce);
        let value = digest::answer(
            ch,
            &self.user,
            &self.password,
            req.method.as_str(),
            &req.uri.to_string(),
            nc,
            &cnonce,
        );
        req.headers.remove_all(header);
        req.headers.push(header, value);
        if let Ok(cseq) = req.cseq() {
            req.headers.set(
                "CSeq",
                format!("{} {}", cseq.seq.saturating_add(1), req.method),
            );
        }
    }

    /// [`Credentials::challenge`], [`Credentials::answers`] and [`Credentials::authorize`] in
    /// one: true when `req` now carries credentials answering `resp` and should be sent again.
    pub fn answer(&self, req: &mut Request, resp: &Response, answered: &mut u32) -> bool {
        let Some(ch) = self.challenge(req, resp) else {
            return false;
        };
        if !Credentials::answers(&ch, *answered) {
            return false;
        }
        *answered += 1;
        self.authorize(req, resp.status, &ch);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sip::message::{self, Message};

    fn request(method: &str, extra: &str) -> Request {
        let text = format!(
            "{method} sip:bob@example.com SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK1\r\n\
             From: <sip:alice@example.com>;tag=a\r\nTo: <sip:bob@example.com>\r\nCall-ID: c1\r\n\
             CSeq: 7 {method}\r\n{extra}Content-Length: 0\r\n\r\n"
        );
        match message::parse(text.as_bytes(), &message::Limits::default()) {
            Ok(Message::Request(r)) => r,
            other => panic!("not a request: {other:?}"),
        }
    }

    fn challenged(req: &Request, status: u16, challenges: &[(&str, &str, bool)]) -> Response {
        let mut resp = message::make_response(req, status, None, Some("t"));
        let header = if status == 401 {
            "WWW-Authenticate"
        } else {
            "Proxy-Authenticate"
        };
        for (realm, alg, stale) in challenges {
            resp.headers.push(
                header,
                format!(
                    "Digest realm=\"{realm}\", nonce=\"n-{alg}\", algorithm={alg}, qop=\"auth\"{}",
                    if *stale { ", stale=true" } else { "" }
                ),
            );
        }
        resp
    }

    #[test]
    fn the_strongest_algorithm_of_the_relays_realm_is_answered() {
        let c = Credentials::new("alice", "pw", Some("example.com".into()));
        let mut req = request("INVITE", "");
        let resp = challenged(
            &req,
            407,
            &[
                ("other.net", "SHA-256", false),
                ("example.com", "MD5", false),
                ("example.com", "SHA-256", false),
            ],
        );
        let mut answered = 0;
        assert!(c.answer(&mut req, &resp, &mut answered));
        let value = req.headers.get("Proxy-Authorization").unwrap_or_default();
        assert!(value.contains("realm=\"example.com\""), "{value}");
        assert!(value.contains("algorithm=SHA-256"), "{value}");
        assert_eq!(req.cseq().map(|c| c.seq).ok(), Some(8));
    }

    #[test]
    fn other_realms_and_a_401_to_an_invite_get_nothing() {
        let c = Credentials::new("alice", "pw", Some("example.com".into()));
        let req = request("INVITE", "");
        let mut answered = 0;
        let mut r = req.clone();
        assert!(!c.answer(
            &mut r,
            &challenged(&req, 407, &[("other.net", "MD5", false)]),
            &mut answered
        ));
        assert!(!c.answer(
            &mut r,
            &challenged(&req, 401, &[("example.com", "MD5", false)]),
            &mut answered
        ));
        assert!(!r.headers.contains("Proxy-Authorization"));
        assert!(!r.headers.contains("Authorization"));
    }

    #[test]
    fn the_realm_is_learnt_from_the_first_challenge_only() {
        let c = Credentials::new("svc", "pw", None);
        let mut req = request("REGISTER", "");
        let resp = challenged(&req, 401, &[("example.com", "MD5", false)]);
        let mut answered = 0;
        assert!(c.answer(&mut req, &resp, &mut answered));
        assert_eq!(c.realm().as_deref(), Some("example.com"));
        // A challenge of another realm to a request that already carries credentials is not
        // learnt nor answered.
        let c2 = Credentials::new("svc", "pw", None);
        let mut with = request("REGISTER", "Authorization: Digest username=\"svc\"\r\n");
        let resp = challenged(&with, 401, &[("evil.net", "MD5", false)]);
        assert!(!c2.answer(&mut with, &resp, &mut 0));
        assert_eq!(c2.realm(), None);
    }

    #[test]
    fn a_second_challenge_is_answered_only_when_stale() {
        let c = Credentials::new("alice", "pw", Some("example.com".into()));
        let mut req = request("REGISTER", "");
        let mut answered = 0;
        let first = challenged(&req, 401, &[("example.com", "MD5", false)]);
        assert!(c.answer(&mut req, &first, &mut answered));
        let again = challenged(&req, 401, &[("example.com", "MD5", false)]);
        assert!(
            !c.answer(&mut req.clone(), &again, &mut answered),
            "wrong password: stop"
        );
        let stale = challenged(&req, 401, &[("example.com", "MD5", true)]);
        assert!(c.answer(&mut req, &stale, &mut answered));
        assert!(!c.answer(&mut req, &stale, &mut answered), "at most twice");
        assert_eq!(req.cseq().map(|c| c.seq).ok(), Some(9));
    }
}
