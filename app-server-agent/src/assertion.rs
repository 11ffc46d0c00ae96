//! Checks what the relay vouched for on an INVITE: the `Relay-Assertion` header must verify
//! under the account's assertion key, be unexpired, be meant for this account and this Call-ID,
//! and not have been used before (one session per assertion).
//!
//! Decides only whether the INVITE comes from the relay; whether to accept the session is
//! [`crate::admission`]'s business.

use proto::service::{ASSERTION_HEADER, Assertion, AssertionError, assertion_key};
use proto::sip::digest::{self, Algorithm};
use proto::sip::message::Request;
use std::collections::HashMap;
use std::sync::Mutex;

/// Most assertions remembered against replay (each until its expiry).
const MAX_REMEMBERED: usize = 1_000_000;

/// Verifies assertions for one application server account.
pub(crate) struct Verifier {
    key: [u8; 32],
    account: String,
    /// Session ids already used, with their assertion's expiry.
    used: Mutex<HashMap<String, u64>>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("account", &self.account)
            .finish_non_exhaustive()
    }
}

/// Why an INVITE is not vouched for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Unvouched {
    Missing,
    Several,
    Invalid(AssertionError),
    OtherServer,
    OtherCall,
    Replayed,
}

impl std::fmt::Display for Unvouched {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unvouched::Missing => write!(f, "no {ASSERTION_HEADER} header"),
            Unvouched::Several => write!(f, "more than one {ASSERTION_HEADER} header"),
            Unvouched::Invalid(e) => write!(f, "{e}"),
            Unvouched::OtherServer => f.write_str("assertion is for another server account"),
            Unvouched::OtherCall => f.write_str("assertion is for another call"),
            Unvouched::Replayed => f.write_str("assertion already used"),
        }
    }
}

impl Verifier {
    /// The verifier of `account`, whose key derives from its SHA-256 HA1 in `realm`.
    pub(crate) fn new(account: &str, realm: &str, password: &str) -> Verifier {
        let ha1 = digest::ha1(Algorithm::Sha256, account, realm, password);
        Verifier {
            key: assertion_key(&ha1),
            account: account.to_string(),
            used: Mutex::new(HashMap::new()),
        }
    }

    /// The session id of a genuine assertion on `invite`, for messages (nothing is marked).
    pub(crate) fn peek(&self, invite: &Request, now_unix: u64) -> Option<String> {
        let value = invite.headers.get(ASSERTION_HEADER)?;
        Assertion::verify(value, &self.key, now_unix)
            .ok()
            .map(|a| a.sid)
    }

    /// The relay's assertion on a change within session `sid` (a re-INVITE or UPDATE): it must
    /// hold for this account, this call and this session; it is not marked used (it vouches
    /// for a session that already exists, not for a new one).
    pub(crate) fn check_change(
        &self,
        req: &Request,
        sid: &str,
        now_unix: u64,
    ) -> Result<Assertion, Unvouched> {
        let a = self.verified(req, now_unix)?;
        if a.sid != sid {
            return Err(Unvouched::OtherCall);
        }
        Ok(a)
    }

    /// The one assertion on `req`, signed with this account's key, for this account and call.
    fn verified(&self, req: &Request, now_unix: u64) -> Result<Assertion, Unvouched> {
        let mut values = req.headers.get_all(ASSERTION_HEADER);
        let value = values.next().ok_or(Unvouched::Missing)?;
        if values.next().is_some() {
            return Err(Unvouched::Several);
        }
        let a = Assertion::verify(value, &self.key, now_unix).map_err(Unvouched::Invalid)?;
        if a.server != self.account {
            return Err(Unvouched::OtherServer);
        }
        if req.call_id() != Some(a.call_id.as_str()) {
            return Err(Unvouched::OtherCall);
        }
        Ok(a)
    }

    /// The relay's assertion on `invite`, if it holds; marks it used.
    pub(crate) fn check(&self, invite: &Request, now_unix: u64) -> Result<Assertion, Unvouched> {
        let a = self.verified(invite, now_unix)?;
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        if used.contains_key(&a.sid) {
            return Err(Unvouched::Replayed);
        }
        if used.len() >= MAX_REMEMBERED {
            used.retain(|_, exp| *exp >= now_unix);
            if used.len() >= MAX_REMEMBERED {
                // Still full of live assertions: refuse rather than forget one.
                return Err(Unvouched::Replayed);
            }
        }
        used.insert(a.sid.clone(), a.exp);
        // Forget expired ones as we go (an expired assertion fails verification anyway), so the
        // map holds about rate × assertion lifetime, not up to its cap.
        if used.len() % 4096 == 0 {
            used.retain(|_, exp| *exp >= now_unix);
        }
        Ok(a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::sip::message::{Method, Uri};

    fn invite(call_id: &str, assertion: Option<&str>) -> Request {
        let mut r = Request::new(Method::Invite, Uri::parse("sip:wine@127.0.0.1").unwrap());
        r.headers.push("Call-ID", call_id);
        if let Some(a) = assertion {
            r.headers.push(ASSERTION_HEADER, a);
        }
        r
    }

    fn assertion(server: &str, call_id: &str, sid: &str) -> Assertion {
        Assertion {
            user: "alice".into(),
            sid: sid.into(),
            service: "wine".into(),
            server: server.into(),
            call_id: call_id.into(),
            detail: None,
            exp: 1_000,
        }
    }

    #[test]
    fn only_fresh_assertions_for_this_account_and_call_hold() {
        let v = Verifier::new("vendor", "relay.test", "pw");
        let key = assertion_key(&digest::ha1(
            Algorithm::Sha256,
            "vendor",
            "relay.test",
            "pw",
        ));
        let good = assertion("vendor", "c1", "s1").sign(&key);
        assert_eq!(v.check(&invite("c1", None), 10), Err(Unvouched::Missing));
        assert_eq!(
            v.check(&invite("c2", Some(&good)), 10),
            Err(Unvouched::OtherCall)
        );
        assert_eq!(
            v.check(&invite("c1", Some(&good)), 2_000),
            Err(Unvouched::Invalid(AssertionError::Expired))
        );
        assert!(v.check(&invite("c1", Some(&good)), 10).is_ok());
        assert_eq!(
            v.check(&invite("c1", Some(&good)), 10),
            Err(Unvouched::Replayed)
        );
        let other = assertion("someone", "c1", "s2").sign(&key);
        assert_eq!(
            v.check(&invite("c1", Some(&other)), 10),
            Err(Unvouched::OtherServer)
        );
        let wrong_key = assertion_key("x");
        let forged = assertion("vendor", "c1", "s3").sign(&wrong_key);
        assert_eq!(
            v.check(&invite("c1", Some(&forged)), 10),
            Err(Unvouched::Invalid(AssertionError::BadSignature))
        );
    }
}
