//! The service-session contracts the three programs exchange over SIP (SPEC features 1 and 3).
//!
//! - [`ServiceRequest`]: the optional body of a client's `INVITE sip:SERVICE@DOMAIN`
//!   (content type [`SERVICE_REQUEST_TYPE`]): a flat JSON object of string fields, `detail` being
//!   the one the relay keeps in the session's record. Operator rules can match any field.
//! - [`Assertion`]: what the relay vouches for on each INVITE it relays to an application
//!   server, in the [`ASSERTION_HEADER`] header: the authenticated user, the session id, the
//!   service, the Call-ID, the server account it is meant for and an expiry, signed with
//!   HMAC-SHA-256 under a key both sides derive from the server account's credentials
//!   ([`assertion_key`]): the relay from the stored HA1, the agent from its password. Nothing
//!   else is shared and nothing travels in clear.
//! - [`ServiceAccess`]: the body of the application server's 200 OK (content type
//!   [`SERVICE_ACCESS_TYPE`]) when the INVITE offered no SDP: the URL of the service with a
//!   one-time token. When the INVITE offered SDP (a softphone), the 200 carries an SDP answer and
//!   the URL travels in a `Call-Info: <URL>;purpose=info` header instead.
//! - [`ChargeSummary`]: the time charge the relay adds to the client's copy of the 200 for its
//!   BYE (or to the BYE it relays to the client), in the [`CHARGE_HEADER`] header.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use std::collections::BTreeMap;

/// Content type of the service-request body of an INVITE.
pub const SERVICE_REQUEST_TYPE: &str = "application/vnd.sip-relay.service-request+json";
/// Content type of the service-access body of a 200 OK.
pub const SERVICE_ACCESS_TYPE: &str = "application/vnd.sip-relay.service-access+json";
/// The header carrying the relay's signed assertion on an INVITE to an application server.
/// The relay removes any copy a client put in.
pub const ASSERTION_HEADER: &str = "Relay-Assertion";
/// The header carrying the time charge of a session to the client.
pub const CHARGE_HEADER: &str = "Relay-Charge";
/// The header on a BYE the relay sends itself, when it ends a session (maximum duration, a
/// vanished party, its own stop): the reason, e.g. `Relay-End: max-duration`. Parties report
/// such a session as ended by the relay.
pub const END_HEADER: &str = "Relay-End";

/// On the relay's 488 refusing a service change (a re-INVITE or UPDATE with a service request)
/// that the session's server does not deliver: the service found for the new details, to
/// transfer to instead, e.g. `Relay-Transfer-To: beer`.
pub const TRANSFER_HEADER: &str = "Relay-Transfer-To";

/// A URI parameter on the Contact of the relay's 302 to an additional server (and so on the
/// Request-URI of the request that follows it): a redirected request is never redirected again.
pub const REDIRECTED_PARAM: &str = "redirected";

/// A URI parameter of a request for a service (`sip:beer@DOMAIN;from-session=SID`): the new
/// session continues session SID of the same user (a transfer; the records are linked). A
/// parameter, not an embedded header, because softphones copy a REFER's Refer-To URI into
/// their INVITE's request line as it is.
pub const FROM_SESSION_PARAM: &str = "from-session";

/// Beside [`FROM_SESSION_PARAM`]: the first session goes on (else the relay ends it, reason
/// `transferred`, once the new one is established).
pub const KEEP_FIRST_PARAM: &str = "keep-first";

/// The URI of a transfer of session `sid` to `service` at `domain`.
pub fn transfer_uri(service: &str, domain: &str, sid: &str, keep_first: bool) -> String {
    let keep = if keep_first {
        format!(";{KEEP_FIRST_PARAM}")
    } else {
        String::new()
    };
    format!("sip:{service}@{domain};{FROM_SESSION_PARAM}={sid}{keep}")
}

/// On the 2xx that accepted a service change, added by the relay: the service the session runs
/// under from now on (the search may have found another service for the new details).
pub const SERVICE_HEADER: &str = "Relay-Service";

/// The reason phrase of the 503 a relay gives new calls (and calls still ringing) while it
/// stops.
pub const STOPPING_REASON: &str = "Relay stopping";

/// Removes every `Relay-*` header: only the relay writes them, so a copy a party put in is
/// forged.
pub fn strip_relay_headers(headers: &mut crate::sip::message::Headers) {
    headers.0.retain(|h| {
        !h.name
            .get(..6)
            .is_some_and(|p| p.eq_ignore_ascii_case("relay-"))
    });
}
/// A service request in a header (base64url of its JSON), for a change within a session whose
/// body must stay SDP: a softphone answers a re-INVITE with SDP, and ignores this header.
pub const SERVICE_REQUEST_HEADER: &str = "Service-Request";

/// Largest service-request body the relay and the agents accept.
pub const MAX_SERVICE_REQUEST: usize = 8 * 1024;

/// The service request a client sends in its INVITE: string fields, `detail` being free text
/// about what the user wants (kept in the record), any other field available to rules.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceRequest {
    #[serde(flatten)]
    pub fields: BTreeMap<String, String>,
}

/// Why a service-request body was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    #[error("service request is larger than {MAX_SERVICE_REQUEST} bytes")]
    TooLarge,
    #[error("service request is not a JSON object of string fields: {0}")]
    Invalid(String),
    #[error("unsupported content type {0:?} (expected {SERVICE_REQUEST_TYPE})")]
    ContentType(String),
}

impl ServiceRequest {
    /// The `detail` field, if any.
    pub fn detail(&self) -> Option<&str> {
        self.fields.get("detail").map(String::as_str)
    }

    pub fn with_detail(detail: &str) -> ServiceRequest {
        let mut fields = BTreeMap::new();
        fields.insert("detail".to_string(), detail.to_string());
        ServiceRequest { fields }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| "{}".into())
    }

    /// The service request as [`SERVICE_REQUEST_HEADER`] carries it: base64url of its JSON.
    pub fn to_header(&self) -> String {
        use base64::Engine as _;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(self.to_json())
    }

    /// Reads a [`SERVICE_REQUEST_HEADER`] value.
    pub fn from_header(value: &str) -> Result<ServiceRequest, BodyError> {
        use base64::Engine as _;
        let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(value.trim())
            .map_err(|e| BodyError::Invalid(format!("not base64url: {e}")))?;
        Self::parse(&json)
    }

    /// The service request a re-INVITE or UPDATE changes a session to: its body (of type
    /// [`SERVICE_REQUEST_TYPE`]), or, beside an SDP body (a softphone's session), the
    /// [`SERVICE_REQUEST_HEADER`]. `None` when it carries neither.
    pub fn of_change(
        headers: &crate::sip::message::Headers,
        body: &[u8],
    ) -> Option<Result<ServiceRequest, BodyError>> {
        if !body.is_empty()
            && crate::sip::message::is_media_type(headers.get("Content-Type"), SERVICE_REQUEST_TYPE)
        {
            return Some(Self::parse(body));
        }
        headers.get(SERVICE_REQUEST_HEADER).map(Self::from_header)
    }

    /// Parses a body of content type [`SERVICE_REQUEST_TYPE`].
    pub fn parse(body: &[u8]) -> Result<ServiceRequest, BodyError> {
        if body.len() > MAX_SERVICE_REQUEST {
            return Err(BodyError::TooLarge);
        }
        serde_json::from_slice(body).map_err(|e| BodyError::Invalid(e.to_string()))
    }

    /// The service request of an INVITE: `Ok(None)` without a body or with an SDP offer,
    /// an error for a body of another type or a malformed one.
    pub fn from_message(
        content_type: Option<&str>,
        body: &[u8],
    ) -> Result<Option<ServiceRequest>, BodyError> {
        if body.is_empty() {
            return Ok(None);
        }
        let ct = content_type
            .map(|c| {
                c.split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_ascii_lowercase()
            })
            .unwrap_or_default();
        if ct == SERVICE_REQUEST_TYPE {
            Self::parse(body).map(Some)
        } else if ct == "application/sdp" || ct.starts_with("multipart/") {
            Ok(None)
        } else {
            Err(BodyError::ContentType(ct))
        }
    }
}

/// How the client reaches the service, in the body of the application server's 200 OK.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceAccess {
    /// The service's URL with a one-time token in its query.
    pub url: String,
    pub service: String,
    pub session_id: String,
    /// The application server account that accepted.
    pub server: String,
}

impl ServiceAccess {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| "{}".into())
    }

    pub fn parse(body: &[u8]) -> Option<ServiceAccess> {
        serde_json::from_slice(body).ok()
    }
}

/// What the relay vouches for when it relays a session to an application server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assertion {
    /// The authenticated user.
    pub user: String,
    /// The session id (also the id of the session's record at the relay).
    pub sid: String,
    /// The service the relay chose.
    pub service: String,
    /// The application server account this copy of the INVITE is for.
    pub server: String,
    /// The Call-ID of the INVITE: an assertion does not validate another call.
    pub call_id: String,
    /// The `detail` field of the service request, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Expiry, Unix seconds.
    pub exp: u64,
}

/// Why an assertion did not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AssertionError {
    #[error("assertion is malformed")]
    Malformed,
    #[error("assertion signature does not verify")]
    BadSignature,
    #[error("assertion expired")]
    Expired,
}

type HmacSha256 = Hmac<Sha256>;

/// The assertion key of an application server account, from its SHA-256 HA1
/// (`SHA-256(account:realm:password)` in hex, as [`crate::sip::digest::ha1`] computes it).
pub fn assertion_key(ha1_sha256_hex: &str) -> [u8; 32] {
    let mut mac = HmacSha256::new_from_slice(ha1_sha256_hex.as_bytes())
        .unwrap_or_else(|_| HmacSha256::new_from_slice(b"-").expect("fixed key"));
    mac.update(b"sip-relay assertion v1");
    mac.finalize().into_bytes().into()
}

impl Assertion {
    /// `base64url(JSON) "." base64url(HMAC-SHA-256(key, base64url(JSON)))`.
    pub fn sign(&self, key: &[u8; 32]) -> String {
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(self).unwrap_or_default());
        let mut mac = HmacSha256::new_from_slice(key).expect("any key length");
        mac.update(payload.as_bytes());
        let sig = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        format!("{payload}.{sig}")
    }

    /// Checks the signature (in constant time) and the expiry.
    pub fn verify(value: &str, key: &[u8; 32], now_unix: u64) -> Result<Assertion, AssertionError> {
        let (payload, sig) = value
            .trim()
            .split_once('.')
            .ok_or(AssertionError::Malformed)?;
        let sig = URL_SAFE_NO_PAD
            .decode(sig)
            .map_err(|_| AssertionError::Malformed)?;
        let mut mac = HmacSha256::new_from_slice(key).expect("any key length");
        mac.update(payload.as_bytes());
        mac.verify_slice(&sig)
            .map_err(|_| AssertionError::BadSignature)?;
        let json = URL_SAFE_NO_PAD
            .decode(payload)
            .map_err(|_| AssertionError::Malformed)?;
        let a: Assertion = serde_json::from_slice(&json).map_err(|_| AssertionError::Malformed)?;
        if a.exp < now_unix {
            return Err(AssertionError::Expired);
        }
        Ok(a)
    }
}

/// The time charge of a session, as the relay rated it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChargeSummary {
    /// Integer minor units of `currency`.
    pub amount_minor: i64,
    /// ISO 4217 code.
    pub currency: String,
    /// Measured duration of the session.
    pub duration_ms: i64,
    /// The seconds billed (the duration rounded up to the tariff's increment).
    pub billed_secs: i64,
    /// The session id.
    pub session: String,
}

impl ChargeSummary {
    /// `amount=120;currency=EUR;duration-ms=61234;billed-secs=62;session=…`
    pub fn to_header(&self) -> String {
        format!(
            "amount={};currency={};duration-ms={};billed-secs={};session={}",
            self.amount_minor, self.currency, self.duration_ms, self.billed_secs, self.session
        )
    }

    pub fn parse(value: &str) -> Option<ChargeSummary> {
        let mut amount = None;
        let mut currency = None;
        let mut duration = None;
        let mut billed = None;
        let mut session = None;
        for part in value.split(';') {
            let (k, v) = part.split_once('=')?;
            let v = v.trim();
            match k.trim() {
                "amount" => amount = v.parse().ok(),
                "currency" => currency = Some(v.to_string()),
                "duration-ms" => duration = v.parse().ok(),
                "billed-secs" => billed = v.parse().ok(),
                "session" => session = Some(v.to_string()),
                _ => {}
            }
        }
        Some(ChargeSummary {
            amount_minor: amount?,
            currency: currency?,
            duration_ms: duration?,
            billed_secs: billed.unwrap_or(0),
            session: session.unwrap_or_default(),
        })
    }
}

/// Formats integer minor units for people: `1234` EUR → `12.34 EUR` (ISO 4217 exponent 2 for
/// most currencies, 0 for JPY/KRW and a few others, 3 for BHD/KWD/…).
pub fn format_money(amount_minor: i64, currency: &str) -> String {
    let exp = currency_exponent(currency);
    if exp == 0 {
        return format!("{amount_minor} {currency}");
    }
    let div = 10i64.pow(exp);
    let sign = if amount_minor < 0 { "-" } else { "" };
    let abs = amount_minor.unsigned_abs();
    let div_u = div.unsigned_abs();
    format!(
        "{sign}{}.{:0width$} {currency}",
        abs / div_u,
        abs % div_u,
        width = exp as usize
    )
}

/// The active ISO 4217 currency codes (list one, 2024), for checking what a vendor sends.
const ISO_4217: &[&str] = &[
    "AED", "AFN", "ALL", "AMD", "ANG", "AOA", "ARS", "AUD", "AWG", "AZN", "BAM", "BBD", "BDT",
    "BGN", "BHD", "BIF", "BMD", "BND", "BOB", "BRL", "BSD", "BTN", "BWP", "BYN", "BZD", "CAD",
    "CDF", "CHF", "CLP", "CNY", "COP", "CRC", "CUP", "CVE", "CZK", "DJF", "DKK", "DOP", "DZD",
    "EGP", "ERN", "ETB", "EUR", "FJD", "FKP", "GBP", "GEL", "GHS", "GIP", "GMD", "GNF", "GTQ",
    "GYD", "HKD", "HNL", "HTG", "HUF", "IDR", "ILS", "INR", "IQD", "IRR", "ISK", "JMD", "JOD",
    "JPY", "KES", "KGS", "KHR", "KMF", "KPW", "KRW", "KWD", "KYD", "KZT", "LAK", "LBP", "LKR",
    "LRD", "LSL", "LYD", "MAD", "MDL", "MGA", "MKD", "MMK", "MNT", "MOP", "MRU", "MUR", "MVR",
    "MWK", "MXN", "MYR", "MZN", "NAD", "NGN", "NIO", "NOK", "NPR", "NZD", "OMR", "PAB", "PEN",
    "PGK", "PHP", "PKR", "PLN", "PYG", "QAR", "RON", "RSD", "RUB", "RWF", "SAR", "SBD", "SCR",
    "SDG", "SEK", "SGD", "SHP", "SLE", "SOS", "SRD", "SSP", "STN", "SVC", "SYP", "SZL", "THB",
    "TJS", "TMT", "TND", "TOP", "TRY", "TTD", "TWD", "TZS", "UAH", "UGX", "USD", "UYU", "UZS",
    "VES", "VND", "VUV", "WST", "XAF", "XCD", "XOF", "XPF", "YER", "ZAR", "ZMW", "ZWG",
];

/// Whether `code` is an active ISO 4217 currency code (upper case, as stored).
pub fn is_known_currency(code: &str) -> bool {
    ISO_4217.binary_search(&code).is_ok()
}

/// The ISO 4217 minor-unit exponent of a currency code.
pub fn currency_exponent(currency: &str) -> u32 {
    match currency.to_ascii_uppercase().as_str() {
        "BIF" | "CLP" | "DJF" | "GNF" | "ISK" | "JPY" | "KMF" | "KRW" | "PYG" | "RWF" | "UGX"
        | "VND" | "VUV" | "XAF" | "XOF" | "XPF" => 0,
        "BHD" | "IQD" | "JOD" | "KWD" | "LYD" | "OMR" | "TND" => 3,
        _ => 2,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_reads_its_request_from_the_body_or_beside_sdp() {
        use crate::sip::message::Headers;
        let q = ServiceRequest::with_detail("a dark beer");
        let mut h = Headers::default();
        h.push("Content-Type", SERVICE_REQUEST_TYPE);
        let got = ServiceRequest::of_change(&h, q.to_json().as_bytes());
        assert_eq!(got, Some(Ok(q.clone())));
        let mut h = Headers::default();
        h.push("Content-Type", "application/sdp");
        assert_eq!(ServiceRequest::of_change(&h, b"v=0\r\n"), None);
        h.push(SERVICE_REQUEST_HEADER, q.to_header());
        assert_eq!(ServiceRequest::of_change(&h, b"v=0\r\n"), Some(Ok(q)));
        let mut bad = Headers::default();
        bad.push(SERVICE_REQUEST_HEADER, "not base64!");
        assert!(matches!(
            ServiceRequest::of_change(&bad, b""),
            Some(Err(BodyError::Invalid(_)))
        ));
    }

    #[test]
    fn currencies_are_known_by_their_codes() {
        assert!(
            ISO_4217.windows(2).all(|w| w[0] < w[1]),
            "the list must stay sorted"
        );
        assert!(is_known_currency("EUR") && is_known_currency("JPY") && is_known_currency("ZWG"));
        assert!(!is_known_currency("eur") && !is_known_currency("XXX") && !is_known_currency(""));
        assert_eq!(format_money(1250, "EUR"), "12.50 EUR");
        assert_eq!(format_money(1250, "JPY"), "1250 JPY");
        assert_eq!(format_money(-1250, "KWD"), "-1.250 KWD");
    }

    fn sample() -> Assertion {
        Assertion {
            user: "alice".into(),
            sid: "s-1".into(),
            service: "wine".into(),
            server: "vendor-a".into(),
            call_id: "c1".into(),
            detail: Some("red".into()),
            exp: 1_000,
        }
    }

    /// A known-answer vector, computed apart from this code (Python's hmac, hashlib and
    /// base64 from the format's description): the key is HMAC-SHA-256 under the account's
    /// SHA-256 HA1 (hex) of "sip-relay assertion v1"; the value is base64url(compact JSON,
    /// fields in this order) "." base64url(HMAC-SHA-256(key, that first part)), no padding.
    #[test]
    fn assertion_known_answer() {
        let ha1 = crate::sip::digest::ha1(
            crate::sip::digest::Algorithm::Sha256,
            "vendor-a",
            "relay.test",
            "vendor-a-pw",
        );
        assert_eq!(
            ha1,
            "14918b0eaf2e34bd9250442e33cc4929bbbc41362bdc3b224116d89b6829491f"
        );
        let key = assertion_key(&ha1);
        let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "587ca8e2289518f2ac5b9fdad6a78245e2021288a4ec84bfdb9a1a6e4b4fda1b"
        );
        let a = Assertion {
            user: "alice".into(),
            sid: "5f0c1d2e-0000-4000-8000-000000000001".into(),
            service: "wine".into(),
            server: "vendor-a".into(),
            call_id: "c1@example.com".into(),
            detail: Some("Rioja 2019".into()),
            exp: 1_796_643_600,
        };
        let expected = "eyJ1c2VyIjoiYWxpY2UiLCJzaWQiOiI1ZjBjMWQyZS0wMDAwLTQwMDAtODAwMC0wMDAwMDAwMDAwMDEiLCJzZXJ2aWNlIjoid2luZSIsInNlcnZlciI6InZlbmRvci1hIiwiY2FsbF9pZCI6ImMxQGV4YW1wbGUuY29tIiwiZGV0YWlsIjoiUmlvamEgMjAxOSIsImV4cCI6MTc5NjY0MzYwMH0.FdUQIN7cG4PDoEYxEmTLW-REKMpyVD1B4sMrfxH9z58";
        assert_eq!(a.sign(&key), expected);
        assert_eq!(Assertion::verify(expected, &key, 1_796_643_000), Ok(a));
    }

    #[test]
    fn assertions_verify_only_with_the_key_and_before_expiry() {
        let key = assertion_key("abc");
        let signed = sample().sign(&key);
        assert_eq!(Assertion::verify(&signed, &key, 999), Ok(sample()));
        assert_eq!(
            Assertion::verify(&signed, &assertion_key("abd"), 999),
            Err(AssertionError::BadSignature)
        );
        assert_eq!(
            Assertion::verify(&signed, &key, 1_001),
            Err(AssertionError::Expired)
        );
        // A payload changed in transit (another user) does not verify.
        let (_, sig) = signed.split_once('.').unwrap();
        let mut forged = sample();
        forged.user = "mallory".into();
        let forged_payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&forged).unwrap());
        assert_eq!(
            Assertion::verify(&format!("{forged_payload}.{sig}"), &key, 999),
            Err(AssertionError::BadSignature)
        );
        assert_eq!(
            Assertion::verify("garbage", &key, 0),
            Err(AssertionError::Malformed)
        );
    }

    #[test]
    fn service_requests_are_flat_json_objects() {
        let r = ServiceRequest::from_message(
            Some("application/vnd.sip-relay.service-request+json"),
            br#"{"detail":"red, 2015","lang":"fr"}"#,
        )
        .unwrap()
        .unwrap();
        assert_eq!(r.detail(), Some("red, 2015"));
        assert_eq!(r.fields.get("lang").map(String::as_str), Some("fr"));
        assert!(
            ServiceRequest::from_message(Some("application/sdp"), b"v=0")
                .unwrap()
                .is_none()
        );
        assert!(ServiceRequest::from_message(None, b"").unwrap().is_none());
        assert!(matches!(
            ServiceRequest::from_message(Some("text/plain"), b"x"),
            Err(BodyError::ContentType(_))
        ));
        assert!(matches!(
            ServiceRequest::from_message(Some(SERVICE_REQUEST_TYPE), br#"{"n":1}"#),
            Err(BodyError::Invalid(_))
        ));
    }

    #[test]
    fn charges_round_trip_and_print_in_major_units() {
        let c = ChargeSummary {
            amount_minor: 1234,
            currency: "EUR".into(),
            duration_ms: 61_234,
            billed_secs: 62,
            session: "s".into(),
        };
        assert_eq!(ChargeSummary::parse(&c.to_header()), Some(c));
        assert_eq!(format_money(1234, "EUR"), "12.34 EUR");
        assert_eq!(format_money(5, "EUR"), "0.05 EUR");
        assert_eq!(format_money(-5, "EUR"), "-0.05 EUR");
        assert_eq!(format_money(500, "JPY"), "500 JPY");
        assert_eq!(format_money(1500, "KWD"), "1.500 KWD");
    }
}
