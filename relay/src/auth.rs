//! User authentication: SIP digest challenges and checks against the store.
//!
//! An unknown user and a wrong password take the same path (a dummy HA1 is checked for unknown
//! users), so the answer, its headers and its work are the same. A nonce count that does not grow
//! is refused like a wrong password. Nonces are stateless HMAC tokens with an expiry; an expired
//! nonce with an otherwise valid answer gets `stale=true`.

use crate::cache::TtlCache;
use crate::config::MAX_USER_LEN;
use crate::store::{Store, StoreError, UserCredentials};
use proto::sip::digest::{
    self, Algorithm, Challenge, Count, Credentials, NonceCounts, NonceKey, NonceStatus,
};
use proto::sip::message::Request;
use std::sync::Mutex;

/// Which header pair a challenge uses: 401/WWW-Authenticate for REGISTER (the relay is the
/// registrar), 407/Proxy-Authenticate for requests it relays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Registrar,
    Proxy,
}

impl Role {
    pub fn status(self) -> u16 {
        match self {
            Role::Registrar => 401,
            Role::Proxy => 407,
        }
    }
    pub fn credentials_header(self) -> &'static str {
        match self {
            Role::Registrar => "Authorization",
            Role::Proxy => "Proxy-Authorization",
        }
    }
    pub fn challenge_header(self) -> &'static str {
        match self {
            Role::Registrar => "WWW-Authenticate",
            Role::Proxy => "Proxy-Authenticate",
        }
    }
}

/// What [`Authenticator::screen`] says of a request before any lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Screen {
    /// Credentials for this realm with one of this relay's nonces: check them.
    Pass,
    /// No credentials for this realm: challenge.
    Challenge,
    /// Credentials for this realm with a nonce this relay never issued (most often another
    /// relay's, the client following a redirect): challenged with `stale=true`, so the client
    /// answers again with the same password (baresip gives up on a second plain challenge).
    Stale,
    /// The user name is longer than any account's can be.
    NameTooLong,
}

/// The result of checking a request's credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The request carries a valid answer for this user.
    Authenticated(String),
    /// Answer with a challenge (`stale` set when only the nonce had expired). `failed` names the
    /// user whose credentials were refused, and why, for the log.
    Challenge {
        stale: bool,
        failed: Option<(String, String)>,
    },
}

impl Outcome {
    fn challenge() -> Outcome {
        Outcome::Challenge {
            stale: false,
            failed: None,
        }
    }

    fn refused(user: &str, why: impl Into<String>) -> Outcome {
        Outcome::Challenge {
            stale: false,
            failed: Some((user.to_string(), why.into())),
        }
    }
}

pub struct Authenticator {
    realm: String,
    key: NonceKey,
    counts: Mutex<NonceCounts>,
    lifetime_secs: u64,
    offer_sha256: bool,
    dummy: (String, String),
    accounts: TtlCache<String, Option<UserCredentials>>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("realm", &self.realm)
            .finish_non_exhaustive()
    }
}

impl Authenticator {
    pub fn new(
        realm: &str,
        lifetime_secs: u64,
        offer_sha256: bool,
        cache_ttl: std::time::Duration,
        max_nonces: usize,
    ) -> Authenticator {
        let secret = uuid::Uuid::new_v4().to_string();
        Authenticator {
            realm: realm.to_string(),
            key: NonceKey::random(),
            counts: Mutex::new(NonceCounts::with_lifetime(max_nonces, lifetime_secs)),
            lifetime_secs,
            offer_sha256,
            dummy: (
                digest::ha1(Algorithm::Md5, "-", realm, &secret),
                digest::ha1(Algorithm::Sha256, "-", realm, &secret),
            ),
            accounts: TtlCache::new(cache_ttl, 100_000),
        }
    }

    /// Number of nonces whose counts are remembered (at most `max_nonces`).
    pub fn nonces_tracked(&self) -> usize {
        proto::sync::lock(&self.counts).len()
    }

    pub fn realm(&self) -> &str {
        &self.realm
    }

    /// Challenge header values to add to a 401/407: MD5 first (every client speaks it), then
    /// SHA-256 when enabled.
    pub fn challenges(&self, stale: bool, now_unix: u64) -> Vec<String> {
        let nonce = self.key.issue(now_unix);
        let mut algs = vec![Algorithm::Md5];
        if self.offer_sha256 {
            algs.push(Algorithm::Sha256);
        }
        algs.into_iter()
            .map(|algorithm| {
                Challenge {
                    realm: self.realm.clone(),
                    nonce: nonce.clone(),
                    algorithm,
                    qop_auth: true,
                    stale,
                    opaque: None,
                }
                .to_header_value()
            })
            .collect()
    }

    /// An account's stored hashes (`None` for no such user), from a short-lived cache: changes
    /// made by `relay user …` take effect within the cache's lifetime.
    pub async fn credentials(
        &self,
        store: &Store,
        name: &str,
    ) -> Result<Option<UserCredentials>, StoreError> {
        let now = std::time::Instant::now();
        if let Some(hit) = self.accounts.get(&name.to_string(), now) {
            return Ok(hit);
        }
        let found = store.user_credentials(name).await?;
        self.accounts.put(name.to_string(), found.clone(), now);
        Ok(found)
    }

    /// The request's credentials for this realm (the first readable ones), if any.
    fn realm_credentials(&self, req: &Request, role: Role) -> Option<Credentials> {
        req.headers
            .get_all(role.credentials_header())
            .filter_map(|v| Credentials::parse(v).ok())
            .find(|c| c.realm == self.realm)
    }

    /// What can be said of the request's credentials without the store: whether they exist
    /// for this realm, name a user that can exist, and carry a nonce of this relay's.
    pub fn screen(&self, req: &Request, role: Role) -> Screen {
        let Some(creds) = self.realm_credentials(req, role) else {
            return Screen::Challenge;
        };
        if normalise_username(&creds.username, &self.realm).len() > MAX_USER_LEN {
            return Screen::NameTooLong;
        }
        if self.key.issued_at(&creds.nonce).is_none() {
            return Screen::Stale;
        }
        Screen::Pass
    }

    /// Checks the request's credentials for this role against the store.
    pub async fn check(&self, store: &Store, req: &Request, role: Role, now_unix: u64) -> Outcome {
        let Some(creds) = self.realm_credentials(req, role) else {
            return Outcome::challenge();
        };
        let nonce = self.key.check(&creds.nonce, now_unix, self.lifetime_secs);
        if nonce == NonceStatus::Invalid {
            return Outcome::challenge();
        }
        let user = normalise_username(&creds.username, &self.realm);
        if user.len() > MAX_USER_LEN {
            return Outcome::challenge();
        }
        let stored = match self.credentials(store, user).await {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(error = %e, "Store unavailable during authentication");
                None
            }
        };
        let ha1 = match (&stored, creds.algorithm) {
            (Some(s), Algorithm::Md5) if s.realm == self.realm => s.ha1_md5.as_str(),
            (Some(s), Algorithm::Sha256) if s.realm == self.realm => s.ha1_sha256.as_str(),
            (_, Algorithm::Md5) => self.dummy.0.as_str(),
            (_, Algorithm::Sha256) => self.dummy.1.as_str(),
        };
        let valid = digest::verify(&creds, ha1, req.method.as_str()) && stored.is_some();
        if !valid {
            // For the operator only: the client hears the same challenge whatever the cause.
            let why = match &stored {
                Some(s) if s.realm != self.realm => format!(
                    "the account's realm is {:?}, the relay's domain {:?} (add it again with \
                     --domain {})",
                    s.realm, self.realm, self.realm
                ),
                Some(_) => "wrong password".to_string(),
                None => "no such account (or a wrong password)".to_string(),
            };
            return Outcome::refused(user, why);
        }
        if nonce == NonceStatus::Stale {
            return Outcome::Challenge {
                stale: true,
                failed: None,
            };
        }
        // qop=auth is required (every client we know sends it): without it a sniffed answer
        // could be replayed for the nonce's whole lifetime.
        let Some(nc) = creds.nc.filter(|_| creds.qop.is_some()) else {
            return Outcome::refused(user, "credentials without qop=auth");
        };
        let Some(issued) = self.key.issued_at(&creds.nonce) else {
            return Outcome::challenge();
        };
        let count = self
            .counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .accept(&creds.nonce, issued, nc, now_unix);
        match count {
            Count::Fresh => {}
            Count::Replayed => return Outcome::refused(user, "replayed nonce count"),
            // Too many nonces in use to remember this one's counts: the client takes a new
            // nonce (stale=true makes it do so without asking its user again).
            Count::Forgotten => {
                return Outcome::Challenge {
                    stale: true,
                    failed: None,
                };
            }
        }
        Outcome::Authenticated(user.to_string())
    }
}

/// `alice`, `alice@` (sipsak) and `alice@REALM` all name the user `alice`.
fn normalise_username<'a>(name: &'a str, realm: &str) -> &'a str {
    match name.split_once('@') {
        Some((user, "")) => user,
        Some((user, host)) if host.eq_ignore_ascii_case(realm) => user,
        _ => name,
    }
}

#[cfg(test)]
mod tests {
    use super::normalise_username;

    #[test]
    fn usernames_from_real_clients() {
        assert_eq!(normalise_username("alice", "example.com"), "alice");
        assert_eq!(normalise_username("alice@", "example.com"), "alice");
        assert_eq!(
            normalise_username("alice@example.com", "example.com"),
            "alice"
        );
        assert_eq!(
            normalise_username("alice@other.org", "example.com"),
            "alice@other.org"
        );
    }
}
