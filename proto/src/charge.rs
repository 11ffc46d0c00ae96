//! The charge document: what an application server charges a user for within a session.
//!
//! One document on every channel: the JSON body of a SIP INFO within the session and of the
//! application server's 200 OK for BYE (content type [`CONTENT_TYPE`]), the app-server-agent's
//! `POST /sessions/{id}/charges`, and (field for field) the gRPC `relay.v1.Charge`. Money is
//! integer minor units of an ISO 4217 currency; a refund is its own kind naming the charge it
//! refunds, never a negative price or quantity.
use serde::{Deserialize, Serialize};

/// The content type of a body carrying charges (`{"charges": [...]}`) in SIP.
pub const CONTENT_TYPE: &str = "application/vnd.sip-relay.charges+json";

/// The content type of the relay's answer to a charging INFO (`{"results": [...]}`).
pub const RESULTS_CONTENT_TYPE: &str = "application/vnd.sip-relay.charge-results+json";

/// The longest idempotency key, item id or item name, in characters.
pub const MAX_TEXT: usize = 255;

/// A charge or a refund.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    #[default]
    Charge,
    Refund,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Charge => "charge",
            Kind::Refund => "refund",
        }
    }

    pub fn parse(text: &str) -> Option<Kind> {
        match text {
            "charge" => Some(Kind::Charge),
            "refund" => Some(Kind::Refund),
            _ => None,
        }
    }
}

/// One charge as the application server reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Charge {
    /// The session id; may be left out where the channel names the session (the INFO's and the
    /// BYE's dialog, the HTTP path).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub session_id: String,
    /// The vendor's key, unique per application server: a retry reuses it.
    pub idempotency_key: String,
    pub item_id: String,
    pub item_name: String,
    pub unit_price_minor: i64,
    pub quantity: i64,
    /// ISO 4217 code.
    pub currency: String,
    /// When it happened (UTC ms); 0 or absent: when the relay records it.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub occurred_at_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "is_charge")]
    pub kind: Kind,
    /// For a refund: the idempotency key of the charge it refunds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refunds: Option<String>,
}

impl Charge {
    /// Checks what can be checked without the session: a key, item id and name of 1 to 255
    /// characters without control characters; price and quantity above 0 and their product
    /// within 64 bits; a known ISO 4217 code; a refund naming its charge. Returns price x
    /// quantity, or the outcome (`Invalid`) and a message naming the field.
    pub fn check(&self) -> Result<i64, (Outcome, String)> {
        let c = self;
        let text = |name: &str, value: &str| -> Result<(), (Outcome, String)> {
            if value.trim().is_empty() {
                return Err((Outcome::Invalid, format!("{name} is missing")));
            }
            if value.chars().count() > MAX_TEXT {
                return Err((
                    Outcome::Invalid,
                    format!("{name} is longer than {MAX_TEXT} characters"),
                ));
            }
            if value.chars().any(char::is_control) {
                return Err((
                    Outcome::Invalid,
                    format!("{name} holds a control character"),
                ));
            }
            Ok(())
        };
        text("idempotency_key", &c.idempotency_key)?;
        text("session_id", &c.session_id)?;
        text("item_id", &c.item_id)?;
        text("item_name", &c.item_name)?;
        if let Some(d) = &c.description
            && d.chars().count() > 4 * MAX_TEXT
        {
            return Err((
                Outcome::Invalid,
                format!("description is longer than {} characters", 4 * MAX_TEXT),
            ));
        }
        if c.unit_price_minor <= 0 {
            return Err((
                Outcome::Invalid,
                format!(
                    "unit_price_minor must be above 0 (got {}); a refund is kind \"refund\", never a negative price",
                    c.unit_price_minor
                ),
            ));
        }
        if c.quantity <= 0 {
            return Err((
                Outcome::Invalid,
                format!("quantity must be above 0 (got {})", c.quantity),
            ));
        }
        if !crate::service::is_known_currency(&c.currency) {
            return Err((
                Outcome::Invalid,
                format!(
                    "currency {:?} is not an ISO 4217 code (three capital letters, e.g. EUR)",
                    c.currency
                ),
            ));
        }
        if c.occurred_at_ms < 0 {
            return Err((
                Outcome::Invalid,
                "occurred_at_ms must not be negative".to_string(),
            ));
        }
        match (c.kind, &c.refunds) {
            (Kind::Refund, None) => {
                return Err((
                    Outcome::Invalid,
                    "a refund must name the charge it refunds (refunds: its idempotency_key)"
                        .to_string(),
                ));
            }
            (Kind::Refund, Some(r)) => text("refunds", r)?,
            (Kind::Charge, Some(_)) => {
                return Err((
                    Outcome::Invalid,
                    "refunds is only for kind \"refund\"".to_string(),
                ));
            }
            (Kind::Charge, None) => {}
        }
        c.unit_price_minor.checked_mul(c.quantity).ok_or_else(|| {
            (
                Outcome::Invalid,
                "unit_price_minor x quantity does not fit in 64 bits".to_string(),
            )
        })
    }
}

fn is_zero(v: &i64) -> bool {
    *v == 0
}

fn is_charge(k: &Kind) -> bool {
    *k == Kind::Charge
}

/// A body of charges.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Charges {
    pub charges: Vec<Charge>,
}

impl Charges {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| "{\"charges\":[]}".into())
    }

    /// Parses a body; the error names what is wrong (for a 400 or a refusal).
    pub fn parse(body: &[u8]) -> Result<Charges, String> {
        serde_json::from_slice(body).map_err(|e| format!("bad charges document: {e}"))
    }
}

/// What became of a charge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Recorded now.
    Recorded,
    /// Recorded before under this key with the same charge: the first result again.
    Duplicate,
    /// The key was used before for a different charge; nothing recorded.
    Conflict,
    /// Bad input (the message names the field); nothing recorded.
    Invalid,
    /// No such session, or no such charge to refund; nothing recorded.
    NotFound,
    /// The session was not routed to this application server; nothing recorded.
    Forbidden,
    /// Outside the session and its grace, or above a limit set on the service.
    Refused,
}

impl Outcome {
    /// Whether the charge is in the ledger (now or from before).
    pub fn is_recorded(self) -> bool {
        matches!(self, Outcome::Recorded | Outcome::Duplicate)
    }
}

/// The relay's answer for one charge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChargeResult {
    pub idempotency_key: String,
    pub outcome: Outcome,
    /// The relay's id of the recorded charge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub charge_id: Option<String>,
    /// Price times quantity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amount_minor: Option<i64>,
    /// When the relay recorded it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recorded_at_ms: Option<i64>,
    /// Why it was not recorded, naming the problem.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// A body of results, one per charge in the order they came.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Results {
    pub results: Vec<ChargeResult>,
}

impl Results {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| "{\"results\":[]}".into())
    }

    pub fn parse(body: &[u8]) -> Option<Results> {
        serde_json::from_slice(body).ok()
    }
}

/// The header carrying a session's items to its client, in what tells it the session ended
/// (the 200 for its BYE, or the BYE it gets), beside the time charge in `Relay-Charge`: the
/// bill's JSON, base64url without padding. A header, not a body: softphones ignore a header
/// they do not know, and may refuse a BYE whose body they do not know.
pub const BILL_HEADER: &str = "Relay-Bill";

/// Most lines a bill carries (the rest are on the statement; `more` counts them).
pub const MAX_BILL_LINES: usize = 50;

/// The items of a session as its client is told them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bill {
    pub session_id: String,
    pub lines: Vec<BillLine>,
    /// Lines left out (beyond [`MAX_BILL_LINES`]).
    #[serde(default, skip_serializing_if = "is_zero_usize")]
    pub more: usize,
}

fn is_zero_usize(v: &usize) -> bool {
    *v == 0
}

impl Bill {
    /// The value of a [`BILL_HEADER`].
    pub fn to_header(&self) -> String {
        use base64::Engine as _;
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(serde_json::to_vec(self).unwrap_or_default())
    }

    /// Reads a [`BILL_HEADER`] value.
    pub fn from_header(value: &str) -> Option<Bill> {
        use base64::Engine as _;
        let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(value.trim())
            .ok()?;
        serde_json::from_slice(&json).ok()
    }
}

/// A line of a session's bill: an item or a refund.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BillLine {
    /// `charge` or `refund`.
    pub kind: String,
    /// The item's name.
    pub name: String,
    pub quantity: i64,
    /// Signed: a refund is negative.
    pub amount_minor: i64,
    pub currency: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_document_reads_as_the_issue_writes_it() {
        let body = br#"{"charges": [{"idempotency_key": "k1", "item_id": "wine-12",
            "item_name": "Riesling", "unit_price_minor": 1250, "quantity": 2, "currency": "EUR"}]}"#;
        let doc = Charges::parse(body).unwrap();
        assert_eq!(doc.charges.len(), 1);
        let c = &doc.charges[0];
        assert_eq!((c.unit_price_minor, c.quantity), (1250, 2));
        assert_eq!(c.kind, Kind::Charge);
        assert_eq!(c.session_id, "");
        assert_eq!(Charges::parse(doc.to_json().as_bytes()).unwrap(), doc);
    }

    #[test]
    fn a_bill_survives_its_header() {
        let bill = Bill {
            session_id: "s-1".into(),
            lines: vec![BillLine {
                kind: "charge".into(),
                name: "Riesling, \"2019\"; dry".into(),
                quantity: 2,
                amount_minor: 2500,
                currency: "EUR".into(),
            }],
            more: 0,
        };
        let value = bill.to_header();
        assert!(
            value
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        );
        assert_eq!(Bill::from_header(&value), Some(bill));
        assert_eq!(Bill::from_header("not base64!"), None);
    }

    #[test]
    fn an_unknown_field_is_named() {
        let err = Charges::parse(
            br#"{"charges": [{"idempotency_key": "k", "item_id": "i",
            "item_name": "n", "unit_price_minor": 1, "quantity": 1, "currency": "EUR",
            "price": 3}]}"#,
        )
        .unwrap_err();
        assert!(err.contains("price"), "{err}");
        let err = Charges::parse(br#"{"charges": [{"idempotency_key": "k"}]}"#).unwrap_err();
        assert!(err.contains("item_id"), "{err}");
    }
}
