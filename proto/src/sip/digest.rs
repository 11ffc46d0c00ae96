//! RFC 7616 / RFC 8760 digest authentication for SIP (RFC 3261 §22): MD5 and SHA-256, qop=auth,
//! hexadecimal nonce counts, the literal `uri` as the client sent it, and stateless HMAC nonces
//! that carry their own expiry (answered with `stale=true` once expired).
//!
//! Sans-I/O: nothing here reads a clock; time comes in as `now_unix` (seconds since the epoch).
//! Nothing here panics on input from the network.

use std::collections::VecDeque;
use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use md5::Md5;
use sha2::Sha256;

/// Largest header value [`Credentials::parse`] and [`Challenge::parse`] accept, in bytes.
pub const MAX_HEADER_LEN: usize = 4096;

/// The nonce lifetime [`NonceCounts::new`] assumes; pass the same value to [`NonceKey::check`],
/// or use [`NonceCounts::with_lifetime`] for another.
pub const DEFAULT_NONCE_LIFETIME_SECS: u64 = 300;

/// Longest nonce [`NonceCounts`] will remember (ours are 48 characters).
const MAX_TRACKED_NONCE_LEN: usize = 256;

/// Digest hash algorithm. The `-sess` variants are not supported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Algorithm {
    Md5,
    Sha256,
}

impl Algorithm {
    /// The token as written in headers: `MD5` or `SHA-256`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Algorithm::Md5 => "MD5",
            Algorithm::Sha256 => "SHA-256",
        }
    }

    /// Case-insensitive `MD5`, `SHA-256` (also `SHA256`). Anything else, `-sess` included, is `None`.
    pub fn parse(s: &str) -> Option<Algorithm> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("MD5") {
            Some(Algorithm::Md5)
        } else if s.eq_ignore_ascii_case("SHA-256") || s.eq_ignore_ascii_case("SHA256") {
            Some(Algorithm::Sha256)
        } else {
            None
        }
    }

    /// Length of a lower-case hex digest for this algorithm.
    fn hex_len(self) -> usize {
        match self {
            Algorithm::Md5 => 32,
            Algorithm::Sha256 => 64,
        }
    }

    /// `H(p0:p1:...:pn)` as lower-case hex.
    fn hash_joined(self, parts: &[&str]) -> String {
        match self {
            Algorithm::Md5 => hash_with::<Md5>(parts),
            Algorithm::Sha256 => hash_with::<Sha256>(parts),
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

fn hash_with<D: sha2::Digest>(parts: &[&str]) -> String {
    let mut h = D::new();
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            h.update(b":");
        }
        h.update(p.as_bytes());
    }
    to_hex(&h.finalize())
}

fn to_hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(HEX[usize::from(b >> 4)]));
        s.push(char::from(HEX[usize::from(b & 0x0f)]));
    }
    s
}

/// Compares two byte strings without an early exit on the first difference. The lengths are not
/// secret (they follow from the algorithm).
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// HA1 = H(username:realm:password), lower-case hex. What the store keeps instead of passwords.
pub fn ha1(alg: Algorithm, username: &str, realm: &str, password: &str) -> String {
    alg.hash_joined(&[username, realm, password])
}

/// Errors from parsing an `Authorization`/`WWW-Authenticate`-style header value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    /// The scheme is not `Digest`.
    #[error("not a Digest header")]
    NotDigest,
    /// Longer than [`MAX_HEADER_LEN`].
    #[error("header value too long")]
    TooLong,
    /// A required parameter is absent.
    #[error("missing parameter: {0}")]
    Missing(&'static str),
    /// Syntax error, or a parameter with an invalid value.
    #[error("malformed digest header: {0}")]
    Malformed(&'static str),
    /// `algorithm=` names something other than MD5 / SHA-256.
    #[error("unsupported digest algorithm")]
    UnsupportedAlgorithm,
}

// ---------------------------------------------------------------------------------------------
// Parameter list parsing
// ---------------------------------------------------------------------------------------------

/// Parameters this module understands; used to turn names into `&'static str` for errors and to
/// detect duplicates.
const KNOWN: &[&str] = &[
    "username",
    "realm",
    "nonce",
    "uri",
    "response",
    "algorithm",
    "cnonce",
    "qop",
    "nc",
    "opaque",
    "stale",
    "domain",
];

/// The known parameters of one header value, by index into [`KNOWN`]. Unknown ones are dropped.
struct Params {
    values: [Option<String>; KNOWN.len()],
}

impl Params {
    fn take(&mut self, name: &'static str) -> Option<String> {
        let i = KNOWN.iter().position(|k| *k == name)?;
        self.values.get_mut(i)?.take()
    }

    fn require(&mut self, name: &'static str) -> Result<String, DigestError> {
        self.take(name).ok_or(DigestError::Missing(name))
    }
}

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n')
}

/// RFC 3261 `token` characters.
fn is_token(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'-' | b'.' | b'!' | b'%' | b'*' | b'_' | b'+' | b'`' | b'\'' | b'~'
        )
}

/// Parses `Digest k=v, k="v", ...`: scheme case-insensitive, any amount of whitespace, commas
/// with or without spaces, quoted strings with backslash escapes, parameter names
/// case-insensitive, unknown parameters ignored, known ones at most once.
fn parse_params(value: &str) -> Result<Params, DigestError> {
    if value.len() > MAX_HEADER_LEN {
        return Err(DigestError::TooLong);
    }
    let bytes = value.as_bytes();
    let mut i = 0;
    while i < bytes.len() && is_ws(bytes[i]) {
        i += 1;
    }
    let scheme_start = i;
    while i < bytes.len() && is_token(bytes[i]) {
        i += 1;
    }
    let scheme = value.get(scheme_start..i).unwrap_or("");
    if !scheme.eq_ignore_ascii_case("Digest") {
        return Err(DigestError::NotDigest);
    }
    if i < bytes.len() && !is_ws(bytes[i]) {
        return Err(DigestError::NotDigest);
    }

    let mut params = Params {
        values: Default::default(),
    };
    loop {
        // Separators: whitespace and (possibly empty) list elements.
        while i < bytes.len() && (is_ws(bytes[i]) || bytes[i] == b',') {
            i += 1;
        }
        if i >= bytes.len() {
            break;
        }
        let name_start = i;
        while i < bytes.len() && is_token(bytes[i]) {
            i += 1;
        }
        if i == name_start {
            return Err(DigestError::Malformed("expected a parameter name"));
        }
        let name = value.get(name_start..i).unwrap_or("");
        while i < bytes.len() && is_ws(bytes[i]) {
            i += 1;
        }
        if bytes.get(i) != Some(&b'=') {
            return Err(DigestError::Malformed("expected '='"));
        }
        i += 1;
        while i < bytes.len() && is_ws(bytes[i]) {
            i += 1;
        }
        let val = if bytes.get(i) == Some(&b'"') {
            i += 1;
            let mut out = Vec::new();
            let mut closed = false;
            while i < bytes.len() {
                match bytes[i] {
                    b'\\' => {
                        let Some(&next) = bytes.get(i + 1) else {
                            break;
                        };
                        out.push(next);
                        i += 2;
                    }
                    b'"' => {
                        i += 1;
                        closed = true;
                        break;
                    }
                    b => {
                        out.push(b);
                        i += 1;
                    }
                }
            }
            if !closed {
                return Err(DigestError::Malformed("unterminated quoted string"));
            }
            // Only ASCII backslashes were removed, so this is still UTF-8; checked anyway.
            String::from_utf8(out).map_err(|_| DigestError::Malformed("invalid UTF-8"))?
        } else {
            let start = i;
            while i < bytes.len() && !is_ws(bytes[i]) && bytes[i] != b',' && bytes[i] != b'"' {
                i += 1;
            }
            if i == start {
                return Err(DigestError::Malformed("empty parameter value"));
            }
            value.get(start..i).unwrap_or("").to_owned()
        };
        while i < bytes.len() && is_ws(bytes[i]) {
            i += 1;
        }
        if i < bytes.len() && bytes[i] != b',' {
            return Err(DigestError::Malformed("expected ',' between parameters"));
        }
        if let Some(idx) = KNOWN.iter().position(|k| k.eq_ignore_ascii_case(name)) {
            let slot = params
                .values
                .get_mut(idx)
                .ok_or(DigestError::Malformed("parameter"))?;
            if slot.is_some() {
                return Err(DigestError::Malformed("duplicate parameter"));
            }
            *slot = Some(val);
        }
    }
    Ok(params)
}

fn parse_algorithm(p: &mut Params) -> Result<Algorithm, DigestError> {
    match p.take("algorithm") {
        None => Ok(Algorithm::Md5),
        Some(a) => Algorithm::parse(&a).ok_or(DigestError::UnsupportedAlgorithm),
    }
}

/// `nc`: 1 to 8 hex digits (RFC 7616 says exactly 8; be lenient on the count).
fn parse_nc(s: &str) -> Result<u32, DigestError> {
    if s.is_empty() || s.len() > 8 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(DigestError::Malformed("nc must be 8 hex digits"));
    }
    u32::from_str_radix(s, 16).map_err(|_| DigestError::Malformed("nc must be 8 hex digits"))
}

/// Writes `s` as a quoted-string, escaping `"` and `\`.
fn push_quoted(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
}

// ---------------------------------------------------------------------------------------------
// Credentials (server side)
// ---------------------------------------------------------------------------------------------

/// A parsed Authorization / Proxy-Authorization header value (`Digest k=v, ...`).
///
/// Values are kept literally (after un-quoting): `uri` is what the client hashed, `username`
/// may be e.g. `alice@` (sipsak); the caller decides what to make of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub realm: String,
    pub nonce: String,
    pub uri: String,
    pub response: String,
    /// `MD5` when the header has no `algorithm`.
    pub algorithm: Algorithm,
    pub cnonce: Option<String>,
    pub qop: Option<String>,
    pub nc: Option<u32>,
    pub opaque: Option<String>,
}

impl Credentials {
    /// Parses an Authorization / Proxy-Authorization value. `username`, `realm`, `nonce`, `uri`
    /// and `response` are required; with `qop`, `cnonce` and `nc` are too.
    pub fn parse(value: &str) -> Result<Credentials, DigestError> {
        let mut p = parse_params(value)?;
        let username = p.require("username")?;
        let realm = p.require("realm")?;
        let nonce = p.require("nonce")?;
        let uri = p.require("uri")?;
        let response = p.require("response")?;
        let algorithm = parse_algorithm(&mut p)?;
        let qop = p.take("qop");
        let cnonce = p.take("cnonce");
        let nc = p.take("nc").map(|s| parse_nc(&s)).transpose()?;
        if qop.is_some() {
            if cnonce.is_none() {
                return Err(DigestError::Missing("cnonce"));
            }
            if nc.is_none() {
                return Err(DigestError::Missing("nc"));
            }
        }
        let opaque = p.take("opaque");
        Ok(Credentials {
            username,
            realm,
            nonce,
            uri,
            response,
            algorithm,
            cnonce,
            qop,
            nc,
            opaque,
        })
    }
}

/// The expected `response` for the given parts (lower-case hex); `qop` is `Some((nc, cnonce, qop))`.
fn compute_response(
    alg: Algorithm,
    ha1_hex: &str,
    nonce: &str,
    method: &str,
    uri: &str,
    qop: Option<(u32, &str, &str)>,
) -> String {
    let ha2 = alg.hash_joined(&[method, uri]);
    match qop {
        Some((nc, cnonce, qop)) => {
            let nc = format!("{nc:08x}");
            alg.hash_joined(&[ha1_hex, nonce, &nc, cnonce, qop, &ha2])
        }
        None => alg.hash_joined(&[ha1_hex, nonce, &ha2]),
    }
}

/// Checks the response against the stored HA1 (hex) for this algorithm, with the request method
/// (e.g. "INVITE"), using the literal uri. qop=auth or no qop (RFC 2069); anything else
/// (auth-int) is `false`. The nc is hashed as 8 lower-case hex digits (RFC 7616 `8LHEX`).
/// Constant-time compare. Does not check the nonce: see [`NonceKey::check`] and [`NonceCounts`].
pub fn verify(creds: &Credentials, ha1_hex: &str, method: &str) -> bool {
    let alg = creds.algorithm;
    if ha1_hex.len() != alg.hex_len() || !ha1_hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return false;
    }
    let ha1_hex = ha1_hex.to_ascii_lowercase();
    let qop = match (&creds.qop, creds.nc, &creds.cnonce) {
        (None, _, _) => None,
        (Some(q), Some(nc), Some(cnonce)) if q.eq_ignore_ascii_case("auth") => {
            Some((nc, cnonce.as_str(), q.as_str()))
        }
        _ => return false,
    };
    let expected = compute_response(alg, &ha1_hex, &creds.nonce, method, &creds.uri, qop);
    let given = creds.response.to_ascii_lowercase();
    ct_eq(expected.as_bytes(), given.as_bytes())
}

// ---------------------------------------------------------------------------------------------
// Challenge (client side parse, server side build)
// ---------------------------------------------------------------------------------------------

/// A challenge (WWW-Authenticate / Proxy-Authenticate value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    pub realm: String,
    pub nonce: String,
    pub algorithm: Algorithm,
    /// The server offers `qop=auth`.
    pub qop_auth: bool,
    pub stale: bool,
    pub opaque: Option<String>,
}

impl Challenge {
    /// Parses a WWW-Authenticate / Proxy-Authenticate value. `realm` and `nonce` are required;
    /// `algorithm` defaults to MD5; a qop list such as `"auth,auth-int"` sets `qop_auth`.
    pub fn parse(value: &str) -> Result<Challenge, DigestError> {
        let mut p = parse_params(value)?;
        let realm = p.require("realm")?;
        let nonce = p.require("nonce")?;
        let algorithm = parse_algorithm(&mut p)?;
        let qop_auth = p
            .take("qop")
            .is_some_and(|q| q.split(',').any(|t| t.trim().eq_ignore_ascii_case("auth")));
        let stale = p
            .take("stale")
            .is_some_and(|s| s.trim().eq_ignore_ascii_case("true"));
        let opaque = p.take("opaque");
        Ok(Challenge {
            realm,
            nonce,
            algorithm,
            qop_auth,
            stale,
            opaque,
        })
    }

    /// `Digest realm="…", nonce="…", qop="auth", algorithm=MD5` (+ `, stale=true`, `, opaque="…"`).
    pub fn to_header_value(&self) -> String {
        let mut s = String::with_capacity(128);
        s.push_str("Digest realm=");
        push_quoted(&mut s, &self.realm);
        s.push_str(", nonce=");
        push_quoted(&mut s, &self.nonce);
        if self.qop_auth {
            s.push_str(", qop=\"auth\"");
        }
        s.push_str(", algorithm=");
        s.push_str(self.algorithm.as_str());
        if self.stale {
            s.push_str(", stale=true");
        }
        if let Some(o) = &self.opaque {
            s.push_str(", opaque=");
            push_quoted(&mut s, o);
        }
        s
    }
}

/// Client side: the nonce count and cnonce for each request answered with a nonce (RFC 7616
/// §3.4): the count runs 1, 2, 3 … per nonce, and every new nonce gets a new random cnonce. A
/// few recent nonces are remembered (a client that re-uses a nonce goes on counting).
#[derive(Debug, Default)]
pub struct ClientNonces {
    recent: std::sync::Mutex<VecDeque<(String, u32, String)>>,
}

impl ClientNonces {
    const KEEP: usize = 16;

    /// `(nc, cnonce)` for the next request answered with `nonce`.
    pub fn next(&self, nonce: &str) -> (u32, String) {
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = recent.iter_mut().find(|(n, _, _)| n == nonce) {
            entry.1 = entry.1.saturating_add(1);
            return (entry.1, entry.2.clone());
        }
        let mut bytes = [0u8; 12];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut bytes);
        let cnonce: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        if recent.len() >= Self::KEEP {
            recent.pop_front();
        }
        recent.push_back((nonce.to_string(), 1, cnonce.clone()));
        (1, cnonce)
    }
}

/// Client side: the Authorization value answering `ch`. With qop=auth offered, answers with
/// `qop=auth`, the given `cnonce` and `nc` (8 hex digits); otherwise an RFC 2069 response
/// (no qop, cnonce, nc). Echoes `opaque`.
pub fn answer(
    ch: &Challenge,
    username: &str,
    password: &str,
    method: &str,
    uri: &str,
    nc: u32,
    cnonce: &str,
) -> String {
    let alg = ch.algorithm;
    let h1 = ha1(alg, username, &ch.realm, password);
    let qop = ch.qop_auth.then_some((nc, cnonce, "auth"));
    let response = compute_response(alg, &h1, &ch.nonce, method, uri, qop);
    let mut s = String::with_capacity(256);
    s.push_str("Digest username=");
    push_quoted(&mut s, username);
    s.push_str(", realm=");
    push_quoted(&mut s, &ch.realm);
    s.push_str(", nonce=");
    push_quoted(&mut s, &ch.nonce);
    s.push_str(", uri=");
    push_quoted(&mut s, uri);
    s.push_str(", response=\"");
    s.push_str(&response);
    s.push_str("\", algorithm=");
    s.push_str(alg.as_str());
    if ch.qop_auth {
        s.push_str(", cnonce=");
        push_quoted(&mut s, cnonce);
        s.push_str(&format!(", qop=auth, nc={nc:08x}"));
    }
    if let Some(o) = &ch.opaque {
        s.push_str(", opaque=");
        push_quoted(&mut s, o);
    }
    s
}

// ---------------------------------------------------------------------------------------------
// Stateless nonces
// ---------------------------------------------------------------------------------------------

const NONCE_TS_LEN: usize = 8;
const NONCE_SEQ_LEN: usize = 8;
const NONCE_RAND_LEN: usize = 11;
const NONCE_TAG_LEN: usize = 15;
const NONCE_BODY_LEN: usize = NONCE_TS_LEN + NONCE_SEQ_LEN + NONCE_RAND_LEN;
const NONCE_RAW_LEN: usize = NONCE_BODY_LEN + NONCE_TAG_LEN;
/// base64url without padding of 42 bytes.
const NONCE_B64_LEN: usize = NONCE_RAW_LEN / 3 * 4;

/// Key for stateless nonces:
/// `base64url(ts_be64 || seq_be64 || random88 || HMAC-SHA256(secret, ts || seq || random)[..15])`,
/// where `seq` counts the nonces this key issued (their order, which the replay guard needs).
/// Debug output never shows the secret.
#[derive(Clone)]
pub struct NonceKey {
    /// HMAC state keyed with the secret.
    mac: Hmac<Sha256>,
    /// Nonces issued so far.
    issued: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

/// When, and as which, a nonce was issued ([`NonceKey::issued_at`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Issued {
    /// Unix seconds.
    pub at: u64,
    /// Its place in the order the key issued nonces.
    pub seq: u64,
}

impl fmt::Debug for NonceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("NonceKey(<redacted>)")
    }
}

/// The outcome of [`NonceKey::check`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NonceStatus {
    /// Issued by us and younger than the lifetime.
    Valid,
    /// Issued by us but expired: challenge again with `stale=true`.
    Stale,
    /// Not ours, or garbled.
    Invalid,
}

impl NonceKey {
    pub fn new(secret: [u8; 32]) -> NonceKey {
        // HMAC zero-pads keys shorter than the block size, so this equals HMAC keyed with the
        // 32-byte secret, through the infallible fixed-size constructor.
        let mut key = [0u8; 64];
        key[..32].copy_from_slice(&secret);
        NonceKey {
            mac: <Hmac<Sha256> as Mac>::new(&key.into()),
            issued: Default::default(),
        }
    }

    /// A key from the OS-seeded CSPRNG (nonces do not survive a restart with it).
    pub fn random() -> NonceKey {
        NonceKey::new(rand::random())
    }

    fn tag(&self, msg: &[u8]) -> Hmac<Sha256> {
        let mut mac = self.mac.clone();
        mac.update(msg);
        mac
    }

    /// A fresh nonce stamped with `now_unix` and the next sequence number.
    pub fn issue(&self, now_unix: u64) -> String {
        let seq = self
            .issued
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut raw = [0u8; NONCE_RAW_LEN];
        raw[..NONCE_TS_LEN].copy_from_slice(&now_unix.to_be_bytes());
        raw[NONCE_TS_LEN..NONCE_TS_LEN + NONCE_SEQ_LEN].copy_from_slice(&seq.to_be_bytes());
        let random: [u8; NONCE_RAND_LEN] = rand::random();
        raw[NONCE_TS_LEN + NONCE_SEQ_LEN..NONCE_BODY_LEN].copy_from_slice(&random);
        let tag = self.tag(&raw[..NONCE_BODY_LEN]).finalize().into_bytes();
        raw[NONCE_BODY_LEN..].copy_from_slice(&tag[..NONCE_TAG_LEN]);
        URL_SAFE_NO_PAD.encode(raw)
    }

    /// When and as which a nonce of ours was issued; `None` when it is not ours or garbled.
    pub fn issued_at(&self, nonce: &str) -> Option<Issued> {
        if nonce.len() != NONCE_B64_LEN {
            return None;
        }
        let raw = URL_SAFE_NO_PAD.decode(nonce).ok()?;
        if raw.len() != NONCE_RAW_LEN {
            return None;
        }
        let (body, tag) = raw.split_at(NONCE_BODY_LEN);
        self.tag(body).verify_truncated_left(tag).ok()?;
        let mut ts = [0u8; 8];
        ts.copy_from_slice(&body[..NONCE_TS_LEN]);
        let mut seq = [0u8; 8];
        seq.copy_from_slice(&body[NONCE_TS_LEN..NONCE_TS_LEN + NONCE_SEQ_LEN]);
        Some(Issued {
            at: u64::from_be_bytes(ts),
            seq: u64::from_be_bytes(seq),
        })
    }

    /// Valid (issued by us, younger than `lifetime_secs`), Stale (ours but older, or stamped
    /// implausibly far in the future), Invalid (not ours / garbled).
    pub fn check(&self, nonce: &str, now_unix: u64, lifetime_secs: u64) -> NonceStatus {
        let Some(Issued { at: issued, .. }) = self.issued_at(nonce) else {
            return NonceStatus::Invalid;
        };
        if issued > now_unix {
            // Our clock stepped back; tolerate up to one lifetime of it.
            return if issued - now_unix <= lifetime_secs {
                NonceStatus::Valid
            } else {
                NonceStatus::Stale
            };
        }
        if now_unix - issued < lifetime_secs {
            NonceStatus::Valid
        } else {
            NonceStatus::Stale
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Replay guard
// ---------------------------------------------------------------------------------------------

/// What [`NonceCounts::accept`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Count {
    /// Higher than any count accepted before for this nonce: accepted and remembered.
    Fresh,
    /// Not higher than one accepted before: a replay (or a bad count), refused.
    Replayed,
    /// A nonce whose counts may have been forgotten (the table was full): refuse it as stale,
    /// so the client takes a new nonce; never accept it afresh.
    Forgotten,
}

/// Replay guard for qop=auth nonce counts: remembers the highest nc accepted per nonce, for at
/// most `capacity` nonces and for the nonce's lifetime after it was issued (by then
/// [`NonceKey::check`] calls it stale). When the table is full the nonce issued first is
/// forgotten, and every nonce issued no later than it counts as [`Count::Forgotten`] from then
/// on: a credential once used can never be used again while its nonce is valid, however many
/// nonces come in between. Call it only for nonces that checked `Valid`: such a nonce is
/// identified by its place in the issue order (its MAC binds it), so that is the table's key,
/// and one ordered map serves both lookup and forgetting (no strings kept, no hash table to
/// grow under churn).
#[derive(Debug, Clone)]
pub struct NonceCounts {
    capacity: usize,
    lifetime_secs: u64,
    /// issue order → (highest accepted nc, Unix seconds issued).
    last: std::collections::BTreeMap<u64, (u32, u64)>,
    /// Nonces issued no later than this one (by issue order) may have been forgotten.
    forgotten_through: Option<u64>,
}

impl NonceCounts {
    /// With [`DEFAULT_NONCE_LIFETIME_SECS`] as the nonce lifetime.
    pub fn new(capacity: usize) -> NonceCounts {
        NonceCounts::with_lifetime(capacity, DEFAULT_NONCE_LIFETIME_SECS)
    }

    /// `lifetime_secs` should be the one given to [`NonceKey::check`]. A capacity of 0 counts as 1.
    pub fn with_lifetime(capacity: usize, lifetime_secs: u64) -> NonceCounts {
        NonceCounts {
            capacity: capacity.max(1),
            lifetime_secs,
            last: std::collections::BTreeMap::new(),
            forgotten_through: None,
        }
    }

    /// Number of nonces remembered.
    pub fn len(&self) -> usize {
        self.last.len()
    }

    pub fn is_empty(&self) -> bool {
        self.last.is_empty()
    }

    /// Checks `nc` for `nonce` (issued as [`NonceKey::issued_at`] reads it): [`Count::Fresh`]
    /// (and remembered) when strictly greater than the last accepted one (none yet counts as
    /// 0, so nc=0 is refused).
    pub fn accept(&mut self, nonce: &str, issued: Issued, nc: u32, now_unix: u64) -> Count {
        if nonce.len() > MAX_TRACKED_NONCE_LEN || nc == 0 {
            return Count::Replayed;
        }
        self.prune(now_unix);
        if let Some((last, _)) = self.last.get_mut(&issued.seq) {
            if nc > *last {
                *last = nc;
                return Count::Fresh;
            }
            return Count::Replayed;
        }
        if self.forgotten_through.is_some_and(|t| issued.seq <= t) {
            return Count::Forgotten;
        }
        while self.last.len() >= self.capacity {
            let Some((seq, _)) = self.last.pop_first() else {
                break;
            };
            self.forget_through(seq);
            if issued.seq <= seq {
                // The new nonce was issued no later than the one just forgotten.
                return Count::Forgotten;
            }
        }
        self.last.insert(issued.seq, (nc, issued.at));
        Count::Fresh
    }

    fn forget_through(&mut self, seq: u64) {
        self.forgotten_through = Some(self.forgotten_through.map_or(seq, |t| t.max(seq)));
    }

    /// Forgets nonces issued a lifetime or more ago ([`NonceKey::check`] calls them stale).
    fn prune(&mut self, now_unix: u64) {
        while let Some((&seq, &(_, at))) = self.last.first_key_value() {
            if now_unix.saturating_sub(at) < self.lifetime_secs {
                break;
            }
            self.last.pop_first();
            self.forget_through(seq);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    const RFC7616_NONCE: &str = "7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v";
    const RFC7616_CNONCE: &str = "f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ";
    const RFC7616_REALM: &str = "http-auth@example.org";
    const RFC7616_OPAQUE: &str = "FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS";

    fn rfc7616_creds(alg: Algorithm, response: &str) -> Credentials {
        let header = format!(
            "Digest username=\"Mufasa\", realm=\"{RFC7616_REALM}\", uri=\"/dir/index.html\", \
             algorithm={}, nonce=\"{RFC7616_NONCE}\", nc=00000001, cnonce=\"{RFC7616_CNONCE}\", \
             qop=auth, response=\"{response}\", opaque=\"{RFC7616_OPAQUE}\"",
            alg.as_str()
        );
        Credentials::parse(&header).unwrap()
    }

    fn rfc7616_vector(alg: Algorithm, expected: &str) {
        let creds = rfc7616_creds(alg, expected);
        assert_eq!(creds.algorithm, alg);
        assert_eq!(creds.nc, Some(1));
        let h1 = ha1(alg, "Mufasa", RFC7616_REALM, "Circle of Life");
        assert!(verify(&creds, &h1, "GET"));
        assert!(!verify(&creds, &h1, "POST"));
        let wrong = ha1(alg, "Mufasa", RFC7616_REALM, "circle of life");
        assert!(!verify(&creds, &wrong, "GET"));

        let ch = Challenge {
            realm: RFC7616_REALM.into(),
            nonce: RFC7616_NONCE.into(),
            algorithm: alg,
            qop_auth: true,
            stale: false,
            opaque: Some(RFC7616_OPAQUE.into()),
        };
        let ans = answer(
            &ch,
            "Mufasa",
            "Circle of Life",
            "GET",
            "/dir/index.html",
            1,
            RFC7616_CNONCE,
        );
        let parsed = Credentials::parse(&ans).unwrap();
        assert_eq!(parsed.response, expected);
        assert_eq!(parsed, creds);
        assert!(verify(&parsed, &h1, "GET"));
    }

    #[test]
    fn rfc7616_md5() {
        rfc7616_vector(Algorithm::Md5, "8ca523f5e9506fed4657c9700eebdbec");
    }

    #[test]
    fn rfc7616_sha256() {
        rfc7616_vector(
            Algorithm::Sha256,
            "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1",
        );
    }

    #[test]
    fn rfc2617_md5() {
        let header = "Digest username=\"Mufasa\", realm=\"testrealm@host.com\", \
            nonce=\"dcd98b7102dd2f0e8b11d0f600bfb0c093\", uri=\"/dir/index.html\", qop=auth, \
            nc=00000001, cnonce=\"0a4f113b\", response=\"6629fae49393a05397450978507c4ef1\", \
            opaque=\"5ccc069c403ebaf9f0171e9517f40e41\"";
        let creds = Credentials::parse(header).unwrap();
        assert_eq!(creds.algorithm, Algorithm::Md5);
        let h1 = ha1(
            Algorithm::Md5,
            "Mufasa",
            "testrealm@host.com",
            "Circle Of Life",
        );
        assert!(verify(&creds, &h1, "GET"));
        // Upper-case hex from the store or the client is fine.
        assert!(verify(&creds, &h1.to_ascii_uppercase(), "GET"));
        let mut upper = creds.clone();
        upper.response = upper.response.to_ascii_uppercase();
        assert!(verify(&upper, &h1, "GET"));

        let ch = Challenge::parse(
            "Digest realm=\"testrealm@host.com\", qop=\"auth,auth-int\", \
             nonce=\"dcd98b7102dd2f0e8b11d0f600bfb0c093\", \
             opaque=\"5ccc069c403ebaf9f0171e9517f40e41\"",
        )
        .unwrap();
        assert!(ch.qop_auth);
        assert!(!ch.stale);
        assert_eq!(ch.algorithm, Algorithm::Md5);
        let ans = answer(
            &ch,
            "Mufasa",
            "Circle Of Life",
            "GET",
            "/dir/index.html",
            1,
            "0a4f113b",
        );
        assert_eq!(Credentials::parse(&ans).unwrap(), creds);
    }

    #[test]
    fn no_qop_rfc2069() {
        let ch = Challenge {
            realm: "example.com".into(),
            nonce: "abc".into(),
            algorithm: Algorithm::Md5,
            qop_auth: false,
            stale: false,
            opaque: None,
        };
        let ans = answer(&ch, "bob", "pw", "REGISTER", "sip:example.com", 1, "x");
        assert!(!ans.contains("qop"));
        assert!(!ans.contains("cnonce"));
        let creds = Credentials::parse(&ans).unwrap();
        assert_eq!(creds.qop, None);
        let h1 = ha1(Algorithm::Md5, "bob", "example.com", "pw");
        // H(HA1:nonce:HA2)
        let ha2 = Algorithm::Md5.hash_joined(&["REGISTER", "sip:example.com"]);
        let expected = Algorithm::Md5.hash_joined(&[&h1, "abc", &ha2]);
        assert_eq!(creds.response, expected);
        assert!(verify(&creds, &h1, "REGISTER"));
    }

    #[test]
    fn auth_int_refused_and_bad_ha1() {
        let h1 = ha1(Algorithm::Md5, "bob", "example.com", "pw");
        let ha2 = Algorithm::Md5.hash_joined(&["REGISTER", "sip:example.com"]);
        let resp = Algorithm::Md5.hash_joined(&[&h1, "n", "00000001", "c", "auth-int", &ha2]);
        let creds = Credentials::parse(&format!(
            "Digest username=\"bob\",realm=\"example.com\",nonce=\"n\",uri=\"sip:example.com\",\
             response=\"{resp}\",qop=auth-int,nc=00000001,cnonce=\"c\""
        ))
        .unwrap();
        assert!(!verify(&creds, &h1, "REGISTER"));
        // HA1 of the wrong length / not hex.
        let creds = rfc7616_creds(Algorithm::Sha256, "00");
        let md5_h1 = ha1(Algorithm::Md5, "Mufasa", RFC7616_REALM, "Circle of Life");
        assert!(!verify(&creds, &md5_h1, "GET"));
        assert!(!verify(&creds, "", "GET"));
        assert!(!verify(&creds, &"zz".repeat(32), "GET"));
    }

    #[test]
    fn hex_nc() {
        let h1 = ha1(Algorithm::Md5, "alice", "atlanta.com", "secret");
        let ha2 = Algorithm::Md5.hash_joined(&["REGISTER", "sip:atlanta.com"]);
        let resp = Algorithm::Md5.hash_joined(&[&h1, "nn", "0000000a", "cc", "auth", &ha2]);
        let creds = Credentials::parse(&format!(
            "Digest username=\"alice\", realm=\"atlanta.com\", nonce=\"nn\", \
             uri=\"sip:atlanta.com\", response=\"{resp}\", qop=auth, nc=0000000a, cnonce=\"cc\""
        ))
        .unwrap();
        assert_eq!(creds.nc, Some(10));
        assert!(verify(&creds, &h1, "REGISTER"));
        assert_eq!(
            Credentials::parse(
                "Digest username=a,realm=b,nonce=c,uri=d,response=e,qop=auth,cnonce=f,nc=FFFFFFFF"
            )
            .unwrap()
            .nc,
            Some(u32::MAX)
        );
        for bad in ["00000000g", "1x", "-1", "+1", "000000001"] {
            let h = format!(
                "Digest username=a,realm=b,nonce=c,uri=d,response=e,qop=auth,cnonce=f,nc={bad}"
            );
            assert!(
                matches!(Credentials::parse(&h), Err(DigestError::Malformed(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn literal_uri_is_hashed() {
        let uri = "sip:biloxi.com;transport=tcp";
        let h1 = ha1(Algorithm::Md5, "bob", "biloxi.com", "zanzibar");
        let ha2 = Algorithm::Md5.hash_joined(&["INVITE", uri]);
        let resp = Algorithm::Md5.hash_joined(&[&h1, "nonce1", "00000001", "c1", "auth", &ha2]);
        let header = format!(
            "Digest username=\"bob\", realm=\"biloxi.com\", nonce=\"nonce1\", uri=\"{uri}\", \
             response=\"{resp}\", qop=auth, nc=00000001, cnonce=\"c1\", algorithm=MD5"
        );
        let creds = Credentials::parse(&header).unwrap();
        assert_eq!(creds.uri, uri);
        assert!(verify(&creds, &h1, "INVITE"));
        // A re-serialised form of "the same" URI does not verify.
        let mut other = creds.clone();
        other.uri = "sip:biloxi.com;transport=TCP".into();
        assert!(!verify(&other, &h1, "INVITE"));
    }

    #[test]
    fn real_client_headers_parse() {
        // baresip: no algorithm.
        let c = Credentials::parse(
            "Digest username=\"alice\", realm=\"example.com\", nonce=\"abc\", \
             uri=\"sip:example.com\", response=\"0123\", cnonce=\"x\", qop=auth, nc=00000001",
        )
        .unwrap();
        assert_eq!(c.algorithm, Algorithm::Md5);
        // linphone: double spaces, other order.
        let c = Credentials::parse(
            "Digest  realm=\"example.com\",  nonce=\"abc\",  algorithm=MD5,  opaque=\"op\",  \
             username=\"bob\",  uri=\"sip:example.com\",  response=\"0123\",  cnonce=\"cn\",  \
             nc=00000002,  qop=auth",
        )
        .unwrap();
        assert_eq!(c.username, "bob");
        assert_eq!(c.nc, Some(2));
        assert_eq!(c.opaque.as_deref(), Some("op"));
        // SIPp: no spaces at all.
        let c = Credentials::parse(
            "Digest username=\"service1\",realm=\"example.com\",cnonce=\"6b8b4567\",nc=00000001,\
             qop=auth,uri=\"sip:127.0.0.1:25060\",nonce=\"bm9uY2U\",\
             response=\"d41d8cd98f00b204e9800998ecf8427e\",algorithm=MD5",
        )
        .unwrap();
        assert_eq!(c.username, "service1");
        assert_eq!(c.uri, "sip:127.0.0.1:25060");
        assert_eq!(c.cnonce.as_deref(), Some("6b8b4567"));
        assert_eq!(c.qop.as_deref(), Some("auth"));
        // sipsak: literal username kept.
        let c = Credentials::parse(
            "Digest username=\"alice@\", realm=\"example.com\", nonce=\"abc\", \
             uri=\"sip:example.com\", response=\"0123\", algorithm=MD5",
        )
        .unwrap();
        assert_eq!(c.username, "alice@");
        assert_eq!(c.qop, None);
        // Case-insensitive scheme and names, commas and escapes in quoted strings, unknown params,
        // quoted qop, SHA256 spelling, whitespace around '='.
        let c = Credentials::parse(
            "digest USERNAME = \"a\\\"b,c\\\\d\" , Realm=\"r, s\", nonce=\"n\", URI=\"sip:x\", \
             response=\"00\", Algorithm=sha256, foo=bar, baz=\"q,\\\"\", qop=\"auth\", \
             cnonce=\"c\", nc=1",
        )
        .unwrap();
        assert_eq!(c.username, "a\"b,c\\d");
        assert_eq!(c.realm, "r, s");
        assert_eq!(c.algorithm, Algorithm::Sha256);
        assert_eq!(c.qop.as_deref(), Some("auth"));
        assert_eq!(c.nc, Some(1));
    }

    #[test]
    fn parse_errors() {
        let ok = "username=a, realm=b, nonce=c, uri=d, response=e";
        assert!(Credentials::parse(&format!("Digest {ok}")).is_ok());
        assert_eq!(
            Credentials::parse(&format!("Basic {ok}")),
            Err(DigestError::NotDigest)
        );
        assert_eq!(
            Credentials::parse("Digestusername=a"),
            Err(DigestError::NotDigest)
        );
        assert_eq!(Credentials::parse(""), Err(DigestError::NotDigest));
        assert_eq!(
            Credentials::parse("Digest realm=b, nonce=c, uri=d, response=e"),
            Err(DigestError::Missing("username"))
        );
        assert_eq!(
            Credentials::parse(&format!("Digest {ok}, qop=auth, nc=00000001")),
            Err(DigestError::Missing("cnonce"))
        );
        assert_eq!(
            Credentials::parse(&format!("Digest {ok}, qop=auth, cnonce=x")),
            Err(DigestError::Missing("nc"))
        );
        assert_eq!(
            Credentials::parse(&format!("Digest {ok}, algorithm=MD5-sess")),
            Err(DigestError::UnsupportedAlgorithm)
        );
        assert_eq!(
            Credentials::parse(&format!("Digest {ok}, algorithm=SHA-512-256")),
            Err(DigestError::UnsupportedAlgorithm)
        );
        assert!(matches!(
            Credentials::parse(&format!("Digest {ok}, username=z")),
            Err(DigestError::Malformed(_))
        ));
        assert!(matches!(
            Credentials::parse("Digest username=\"a"),
            Err(DigestError::Malformed(_))
        ));
        assert!(matches!(
            Credentials::parse("Digest username=\"a\\"),
            Err(DigestError::Malformed(_))
        ));
        assert!(matches!(
            Credentials::parse("Digest username=a b"),
            Err(DigestError::Malformed(_))
        ));
        assert!(matches!(
            Credentials::parse("Digest username="),
            Err(DigestError::Malformed(_))
        ));
        let huge = format!("Digest {ok}, x=\"{}\"", "a".repeat(MAX_HEADER_LEN));
        assert_eq!(Credentials::parse(&huge), Err(DigestError::TooLong));
        assert_eq!(Challenge::parse(&huge), Err(DigestError::TooLong));
        assert_eq!(
            Challenge::parse("Digest nonce=\"n\""),
            Err(DigestError::Missing("realm"))
        );
    }

    #[test]
    fn algorithm_names() {
        assert_eq!(Algorithm::parse("md5"), Some(Algorithm::Md5));
        assert_eq!(Algorithm::parse("SHA-256"), Some(Algorithm::Sha256));
        assert_eq!(Algorithm::parse("sha256"), Some(Algorithm::Sha256));
        assert_eq!(Algorithm::parse("SHA-256-sess"), None);
        assert_eq!(Algorithm::parse("MD5-sess"), None);
        assert_eq!(Algorithm::parse(""), None);
        assert_eq!(Algorithm::Md5.as_str(), "MD5");
        assert_eq!(Algorithm::Sha256.as_str(), "SHA-256");
    }

    #[test]
    fn challenge_round_trip() {
        let ch = Challenge {
            realm: "ex\"ample.com".into(),
            nonce: "abc".into(),
            algorithm: Algorithm::Sha256,
            qop_auth: true,
            stale: true,
            opaque: Some("o,p".into()),
        };
        let v = ch.to_header_value();
        assert_eq!(
            v,
            "Digest realm=\"ex\\\"ample.com\", nonce=\"abc\", qop=\"auth\", algorithm=SHA-256, \
             stale=true, opaque=\"o,p\""
        );
        assert_eq!(Challenge::parse(&v).unwrap(), ch);
        let plain = Challenge {
            realm: "r".into(),
            nonce: "n".into(),
            algorithm: Algorithm::Md5,
            qop_auth: false,
            stale: false,
            opaque: None,
        };
        assert_eq!(
            plain.to_header_value(),
            "Digest realm=\"r\", nonce=\"n\", algorithm=MD5"
        );
        assert_eq!(Challenge::parse(&plain.to_header_value()).unwrap(), plain);
        let c = Challenge::parse("Digest realm=r,nonce=n,qop=\"auth-int\",stale=TRUE").unwrap();
        assert!(!c.qop_auth);
        assert!(c.stale);
    }

    #[test]
    fn nonces() {
        let key = NonceKey::new([7; 32]);
        let other = NonceKey::new([8; 32]);
        let now = 1_700_000_000;
        let n = key.issue(now);
        assert_eq!(n.len(), NONCE_B64_LEN);
        assert_ne!(n, key.issue(now));
        assert_eq!(key.check(&n, now, 300), NonceStatus::Valid);
        assert_eq!(key.check(&n, now + 299, 300), NonceStatus::Valid);
        assert_eq!(key.check(&n, now + 300, 300), NonceStatus::Stale);
        assert_eq!(key.check(&n, now + 100_000, 300), NonceStatus::Stale);
        // Clock stepped back a little: still fine; far future stamp: stale.
        assert_eq!(key.check(&n, now - 10, 300), NonceStatus::Valid);
        assert_eq!(key.check(&n, now - 1000, 300), NonceStatus::Stale);
        assert_eq!(other.check(&n, now, 300), NonceStatus::Invalid);
        // Tamper with every character position.
        for i in 0..n.len() {
            let mut b = n.clone().into_bytes();
            b[i] = if b[i] == b'A' { b'B' } else { b'A' };
            let t = String::from_utf8(b).unwrap();
            assert_eq!(key.check(&t, now, 300), NonceStatus::Invalid, "pos {i}");
        }
        for g in [
            "",
            "garbage",
            "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!",
            "dcd98b7102dd2f0e8b11d0f600bfb0c093",
            "ééééééééééééééééééééééé",
        ] {
            assert_eq!(key.check(g, now, 300), NonceStatus::Invalid);
        }
        assert_eq!(
            key.check(&"A".repeat(100_000), now, 300),
            NonceStatus::Invalid
        );
        assert_eq!(key.check(&format!("{n}="), now, 300), NonceStatus::Invalid);
        assert_eq!(key.check(&n[..47], now, 300), NonceStatus::Invalid);
        // Random nonces never panic and never validate.
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..2000 {
            let len = rng.gen_range(0..80);
            let s: String = (0..len)
                .map(|_| char::from(rng.gen_range(0x20u8..0x7f)))
                .collect();
            assert_eq!(key.check(&s, now, 300), NonceStatus::Invalid);
        }
        // Same secret, same verdict; random keys differ.
        assert_eq!(
            NonceKey::new([7; 32]).check(&n, now, 300),
            NonceStatus::Valid
        );
        assert_eq!(NonceKey::random().check(&n, now, 300), NonceStatus::Invalid);
        let r = NonceKey::random();
        assert_eq!(r.check(&r.issue(5), 5, 10), NonceStatus::Valid);
    }

    #[test]
    fn nonce_key_debug_redacted() {
        let key = NonceKey::new([0x41; 32]);
        let d = format!("{key:?}");
        assert!(d.contains("redacted"));
        assert!(!d.contains("41") && !d.contains("65"));
    }

    fn at(at: u64, seq: u64) -> Issued {
        Issued { at, seq }
    }

    #[test]
    fn nonce_counts() {
        let mut c = NonceCounts::new(3);
        assert_eq!(c.accept("a", at(0, 0), 1, 0), Count::Fresh);
        assert_eq!(c.accept("a", at(0, 0), 1, 0), Count::Replayed);
        assert_eq!(c.accept("a", at(0, 0), 2, 0), Count::Fresh);
        assert_eq!(c.accept("a", at(0, 0), 3, 1), Count::Fresh);
        assert_eq!(c.accept("a", at(0, 0), 2, 1), Count::Replayed);
        assert_eq!(c.accept("a", at(0, 0), 10, 1), Count::Fresh);
        assert_eq!(c.accept("b", at(1, 1), 0, 1), Count::Replayed);
        assert!(!c.is_empty() && c.len() == 1);

        // Capacity: the nonce issued first is forgotten, and from then on every nonce issued
        // no later than it is refused as forgotten (stale), never accepted afresh.
        assert_eq!(c.accept("b", at(1, 1), 1, 2), Count::Fresh);
        assert_eq!(c.accept("c", at(1, 2), 1, 3), Count::Fresh);
        assert_eq!(c.len(), 3);
        assert_eq!(c.accept("d", at(1, 3), 1, 4), Count::Fresh);
        assert_eq!(c.len(), 3);
        assert_eq!(
            c.accept("a", at(0, 0), 1, 5),
            Count::Forgotten,
            "a was forgotten"
        );
        assert_eq!(c.accept("a", at(0, 0), 11, 5), Count::Forgotten);
        assert_eq!(c.accept("d", at(1, 3), 1, 5), Count::Replayed);
        assert_eq!(
            c.accept("b", at(1, 1), 2, 5),
            Count::Fresh,
            "still remembered"
        );
        for i in 0..1000u64 {
            assert_eq!(
                c.accept(&format!("n{i}"), at(2, 10 + i), 1, 6),
                Count::Fresh
            );
            assert!(c.len() <= 3);
        }
        assert_eq!(c.accept("b", at(1, 1), 3, 6), Count::Forgotten);
        assert_eq!(c.accept("n999", at(2, 1009), 1, 6), Count::Replayed);

        // Lifetime: nonces issued a lifetime ago are dropped (the key calls them stale).
        let mut c = NonceCounts::with_lifetime(100, 30);
        assert_eq!(c.accept("x", at(100, 0), 5, 100), Count::Fresh);
        assert_eq!(c.accept("x", at(100, 0), 5, 129), Count::Replayed);
        assert_eq!(c.len(), 1);
        assert_eq!(c.accept("y", at(130, 1), 1, 130), Count::Fresh);
        assert_eq!(c.len(), 1);

        // Capacity 0 behaves as 1; over-long nonces are refused.
        let mut c = NonceCounts::new(0);
        assert_eq!(c.accept("a", at(0, 0), 1, 0), Count::Fresh);
        assert_eq!(c.accept("a", at(0, 0), 1, 0), Count::Replayed);
        assert_eq!(
            c.accept(&"n".repeat(10_000), at(0, 1), 1, 0),
            Count::Replayed
        );
    }

    #[test]
    fn a_used_credential_is_never_accepted_again_however_many_nonces_follow() {
        // One credential (nonce + nc) is used, then far more nonces than the table holds are
        // issued and used, many within the same second; the first credential, replayed, must
        // not pass, and no nonce issued after it is refused for the table's sake.
        let key = NonceKey::new([7; 32]);
        let mut c = NonceCounts::with_lifetime(1000, 300);
        let first = key.issue(1_000);
        let issued = key.issued_at(&first).unwrap();
        assert_eq!(c.accept(&first, issued, 1, 1_000), Count::Fresh);
        for i in 0..5_000u64 {
            let n = key.issue(1_000 + i / 1000);
            let at = key.issued_at(&n).unwrap();
            assert_eq!(c.accept(&n, at, 1, 1_000 + i / 1000), Count::Fresh);
        }
        assert_eq!(c.accept(&first, issued, 1, 1_005), Count::Forgotten);
        assert_eq!(c.accept(&first, issued, 2, 1_005), Count::Forgotten);
        assert_eq!(key.issued_at("garbage"), None);
    }

    fn random_header(rng: &mut StdRng) -> String {
        const PIECES: &[&str] = &[
            "Digest",
            "digest ",
            " ",
            "  ",
            ",",
            "=",
            "\"",
            "\\",
            "username",
            "realm",
            "nonce",
            "uri",
            "response",
            "algorithm",
            "qop",
            "nc",
            "cnonce",
            "opaque",
            "stale",
            "auth",
            "auth-int",
            "MD5",
            "SHA-256",
            "true",
            "0000000a",
            "ffffffffff",
            "sip:x@y;transport=tcp",
            "é",
            "\u{1F600}",
            "\t",
            "\r\n",
            "\0",
            "a",
            "1",
        ];
        let n = rng.gen_range(0..40);
        let mut s = String::new();
        if rng.gen_bool(0.7) {
            s.push_str("Digest ");
        }
        for _ in 0..n {
            s.push_str(PIECES[rng.gen_range(0..PIECES.len())]);
        }
        s
    }

    #[test]
    fn garbage_never_panics() {
        let mut rng = StdRng::seed_from_u64(0xd16e57);
        let h1 = ha1(Algorithm::Md5, "a", "b", "c");
        for _ in 0..50_000 {
            let s = random_header(&mut rng);
            if let Ok(c) = Credentials::parse(&s) {
                let _ = verify(&c, &h1, "INVITE");
            }
            if let Ok(ch) = Challenge::parse(&s) {
                let v = ch.to_header_value();
                assert_eq!(Challenge::parse(&v).unwrap(), ch, "{s:?}");
                let a = answer(&ch, "u", "p", "REGISTER", "sip:x", 1, "c");
                assert!(Credentials::parse(&a).is_ok());
            }
        }
        // Raw random bytes (lossily made UTF-8), too.
        for _ in 0..20_000 {
            let len = rng.gen_range(0..200);
            let bytes: Vec<u8> = (0..len).map(|_| rng.r#gen()).collect();
            let mut s = String::from_utf8_lossy(&bytes).into_owned();
            if rng.gen_bool(0.5) {
                s.insert_str(0, "Digest ");
            }
            let _ = Credentials::parse(&s);
            let _ = Challenge::parse(&s);
        }
    }

    #[test]
    fn client_nonce_counts_start_at_one_for_each_nonce() {
        let n = ClientNonces::default();
        let (nc1, c1) = n.next("a");
        let (nc2, c2) = n.next("a");
        let (nc3, c3) = n.next("b");
        assert_eq!((nc1, nc2, nc3), (1, 2, 1));
        assert_eq!(c1, c2);
        assert_ne!(c1, c3);
        assert_eq!(c1.len(), 24);
    }
}
