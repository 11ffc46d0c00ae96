//! Application billing: the rules a charge must pass before it enters the ledger.
//!
//! An application server reports charges (the [`proto::charge`] document) over gRPC, in an INFO
//! within the session or in the body of its 200 OK for BYE; every channel ends in
//! `Store::record_charges`, which applies these rules in the same transaction that writes the
//! charge. A charge counts once per (application server, idempotency key): its row is the key
//! and the ledger line at once, so the line exists only if the key's write succeeded.
//!
//! The rules, in order (the first that fails names the problem, and nothing is stored):
//! 1. fields: a key, item id and name of 1 to 255 characters; price and quantity above 0 and
//!    their product within 64 bits; a known ISO 4217 code; a refund names the charge it refunds;
//! 2. the key: used before with the same charge, the first result again; with another, a conflict;
//! 3. the session: it exists, it was routed to this application server, and it took place;
//! 4. the time: from the session's request (less [`CLOCK_SKEW_MS`]) to its end plus the grace
//!    (`--charge-grace`, 15 minutes by default), or to now (plus the skew) while it runs;
//! 5. limits set on the service: one line, and all lines of the session per currency;
//! 6. a refund: the charge it names is of the same session and currency, and the refunds of it
//!    add up to no more than it.
//!
//! Money is integer minor units; nothing here is a float. This module must not touch the store,
//! the network or a clock: the store calls it with what it read and the time.
pub mod report;

use proto::charge::{Charge, Kind, Outcome};
use sha2::{Digest, Sha256};

use crate::store::CdrState;

/// How far an application server's clock may be ahead of the relay's.
pub const CLOCK_SKEW_MS: i64 = 30_000;

/// The default grace after a session's end during which its charges are still taken.
pub const DEFAULT_GRACE_MS: i64 = 15 * 60_000;

/// Why a charge is not recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub outcome: Outcome,
    pub message: String,
}

fn refuse(outcome: Outcome, message: impl Into<String>) -> Refusal {
    Refusal {
        outcome,
        message: message.into(),
    }
}

/// Checks the fields that need nothing from the store (rule 1); returns price x quantity.
pub fn check_fields(c: &Charge) -> Result<i64, Refusal> {
    c.check()
        .map_err(|(outcome, message)| Refusal { outcome, message })
}

/// The SHA-256 (hex) of the charge as sent: a retry under the same key must match it. Every
/// field counts, the session included, but the time (see [`same_time`]) and the channel.
pub fn fingerprint(c: &Charge) -> String {
    let mut h = Sha256::new();
    for part in [
        c.session_id.as_str(),
        c.idempotency_key.as_str(),
        c.item_id.as_str(),
        c.item_name.as_str(),
        &c.unit_price_minor.to_string(),
        &c.quantity.to_string(),
        c.currency.as_str(),
        c.description.as_deref().unwrap_or("\u{0}none"),
        c.kind.as_str(),
        c.refunds.as_deref().unwrap_or("\u{0}none"),
    ] {
        // Length-prefixed, so no two different charges read the same.
        h.update((part.len() as u64).to_be_bytes());
        h.update(part.as_bytes());
    }
    hex(&h.finalize())
}

/// Whether a retry's time matches the first's: the same instant, or none given (0, "when the
/// relay records it"), so a sender that leaves the time out can retry at any time.
pub fn same_time(retry_ms: i64, recorded_ms: i64) -> bool {
    retry_ms == 0 || retry_ms == recorded_ms
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A new billing token for an application server: `srt_` and 256 random bits, base64url.
pub fn new_token() -> String {
    use base64::Engine;
    let bytes: [u8; 32] = rand::random();
    format!(
        "srt_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

/// What the store keeps of a token: its SHA-256, hex.
pub fn token_sha256(token: &str) -> String {
    hex(&Sha256::digest(token.trim().as_bytes()))
}

/// What the ledger needs to know of a session (from its record).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionFacts {
    pub user: String,
    pub server: Option<String>,
    pub service: Option<String>,
    pub state: CdrState,
    pub created_at_ms: i64,
    pub ended_at_ms: Option<i64>,
}

/// Checks that `appserver` may charge in this session at `at_ms` (rules 3 and 4).
pub fn check_session(
    appserver: &str,
    session_id: &str,
    facts: &SessionFacts,
    at_ms: i64,
    now_ms: i64,
    grace_ms: i64,
) -> Result<(), Refusal> {
    if facts.server.as_deref() != Some(appserver) {
        return Err(refuse(
            Outcome::Forbidden,
            format!("session {session_id} was not routed to application server {appserver}"),
        ));
    }
    if facts.state == CdrState::Failed {
        return Err(refuse(
            Outcome::Refused,
            format!("session {session_id} never took place (its request failed)"),
        ));
    }
    if at_ms < facts.created_at_ms - CLOCK_SKEW_MS {
        return Err(refuse(
            Outcome::Refused,
            format!(
                "the charge's time {} is before session {session_id} began ({})",
                proto::clock::format_utc_ms(at_ms),
                proto::clock::format_utc_ms(facts.created_at_ms)
            ),
        ));
    }
    match facts.ended_at_ms {
        Some(end) if at_ms > end.saturating_add(grace_ms) => Err(refuse(
            Outcome::Refused,
            format!(
                "the charge's time {} is after session {session_id} ended ({}) and its grace of {} s",
                proto::clock::format_utc_ms(at_ms),
                proto::clock::format_utc_ms(end),
                grace_ms / 1000
            ),
        )),
        Some(end) if now_ms > end.saturating_add(grace_ms) => Err(refuse(
            Outcome::Refused,
            format!(
                "session {session_id} ended at {}, more than its grace of {} s ago",
                proto::clock::format_utc_ms(end),
                grace_ms / 1000
            ),
        )),
        None if at_ms > now_ms + CLOCK_SKEW_MS => Err(refuse(
            Outcome::Refused,
            format!(
                "the charge's time {} is in the future",
                proto::clock::format_utc_ms(at_ms)
            ),
        )),
        _ => Ok(()),
    }
}

/// The service's limits on application charges (rule 5).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub max_charge_minor: Option<i64>,
    pub max_session_charges_minor: Option<i64>,
}

/// Checks a charge's amount against the limits, given what the session's charges in the same
/// currency add up to already (refunds subtracted).
pub fn check_limits(amount: i64, session_total: i64, limits: Limits) -> Result<(), Refusal> {
    if let Some(max) = limits.max_charge_minor
        && amount > max
    {
        return Err(refuse(
            Outcome::Refused,
            format!(
                "the charge of {amount} minor units is above the service's limit of {max} a charge"
            ),
        ));
    }
    let total = session_total.checked_add(amount).ok_or_else(|| {
        refuse(
            Outcome::Invalid,
            "the session's charges would not fit in 64 bits",
        )
    })?;
    if let Some(max) = limits.max_session_charges_minor
        && total > max
    {
        return Err(refuse(
            Outcome::Refused,
            format!(
                "the session's charges would be {total} minor units, above the service's limit of {max} a session"
            ),
        ));
    }
    Ok(())
}

/// The charge a refund names, as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refunded {
    pub session_id: String,
    pub kind: Kind,
    pub currency: String,
    pub amount_minor: i64,
    /// What its refunds add up to already.
    pub refunded_minor: i64,
}

/// Checks a refund of `amount` against the charge it names (rule 6).
pub fn check_refund(c: &Charge, amount: i64, target: Option<&Refunded>) -> Result<(), Refusal> {
    let key = c.refunds.as_deref().unwrap_or_default();
    let Some(t) = target else {
        return Err(refuse(
            Outcome::NotFound,
            format!("no charge with idempotency_key {key:?} to refund"),
        ));
    };
    if t.kind != Kind::Charge {
        return Err(refuse(
            Outcome::Invalid,
            format!("{key:?} is a refund; a refund names a charge"),
        ));
    }
    if t.session_id != c.session_id {
        return Err(refuse(
            Outcome::Invalid,
            format!(
                "charge {key:?} belongs to session {}, not {}",
                t.session_id, c.session_id
            ),
        ));
    }
    if t.currency != c.currency {
        return Err(refuse(
            Outcome::Invalid,
            format!(
                "charge {key:?} is in {}, the refund in {}",
                t.currency, c.currency
            ),
        ));
    }
    let after = t.refunded_minor.saturating_add(amount);
    if after > t.amount_minor {
        return Err(refuse(
            Outcome::Refused,
            format!(
                "refunds of {key:?} would add up to {after} minor units, more than its {}",
                t.amount_minor
            ),
        ));
    }
    Ok(())
}

/// The operator's fee on `gross` at `basis_points` hundredths of a percent: rounded half up
/// (away from zero) to a whole minor unit, once per currency total. The net is gross - fee.
pub fn fee(gross: i64, basis_points: i64) -> i64 {
    let product = i128::from(gross) * i128::from(basis_points);
    let fee = if product >= 0 {
        (product + 5_000) / 10_000
    } else {
        (product - 5_000) / 10_000
    };
    i64::try_from(fee).unwrap_or(if fee > 0 { i64::MAX } else { i64::MIN })
}

/// Parses `--fee-percent P` (e.g. `2.5`, at most two decimals, 0 to 100) into basis points.
pub fn parse_fee_percent(text: &str) -> Result<i64, String> {
    let t = text.trim().trim_end_matches('%');
    let bad = || {
        format!(
            "--fee-percent {text:?}: a percentage from 0 to 100 with at most two decimals, e.g. 2.5"
        )
    };
    let (whole, frac) = t.split_once('.').unwrap_or((t, ""));
    if whole.is_empty()
        || frac.len() > 2
        || !whole.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(bad());
    }
    let whole: i64 = whole.parse().map_err(|_| bad())?;
    let frac: i64 = if frac.is_empty() {
        0
    } else {
        format!("{frac:0<2}").parse().map_err(|_| bad())?
    };
    let bp = whole
        .checked_mul(100)
        .and_then(|w| w.checked_add(frac))
        .ok_or_else(bad)?;
    if bp > 10_000 {
        return Err(bad());
    }
    Ok(bp)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wine() -> Charge {
        Charge {
            session_id: "s-1".into(),
            idempotency_key: "k1".into(),
            item_id: "wine-12".into(),
            item_name: "Riesling".into(),
            unit_price_minor: 1250,
            quantity: 2,
            currency: "EUR".into(),
            ..Charge::default()
        }
    }

    fn facts() -> SessionFacts {
        SessionFacts {
            user: "alice".into(),
            server: Some("shop".into()),
            service: Some("wine".into()),
            state: CdrState::Established,
            created_at_ms: 1_000_000,
            ended_at_ms: None,
        }
    }

    #[test]
    fn fields_name_the_problem() {
        assert_eq!(check_fields(&wine()), Ok(2500));
        type Change = fn(&mut Charge);
        let cases: [(Change, &str); 8] = [
            (|c| c.idempotency_key.clear(), "idempotency_key is missing"),
            (
                |c| c.unit_price_minor = -5,
                "unit_price_minor must be above 0",
            ),
            (|c| c.quantity = 0, "quantity must be above 0"),
            (|c| c.currency = "EURO".into(), "not an ISO 4217 code"),
            (
                |c| c.item_name = "x".repeat(256),
                "item_name is longer than 255",
            ),
            (|c| c.kind = Kind::Refund, "must name the charge it refunds"),
            (
                |c| {
                    c.unit_price_minor = i64::MAX;
                    c.quantity = 2
                },
                "does not fit in 64 bits",
            ),
            (
                |c| c.item_id = "a\nb".into(),
                "item_id holds a control character",
            ),
        ];
        for (change, expect) in cases {
            let mut c = wine();
            change(&mut c);
            let r = check_fields(&c).unwrap_err();
            assert_eq!(r.outcome, Outcome::Invalid);
            assert!(
                r.message.contains(expect),
                "{} does not say {expect:?}",
                r.message
            );
        }
    }

    #[test]
    fn a_fingerprint_tells_every_field_apart() {
        let base = fingerprint(&wine());
        assert_eq!(base, fingerprint(&wine()));
        let mut c = wine();
        c.quantity = 3;
        assert_ne!(base, fingerprint(&c));
        let mut c = wine();
        c.occurred_at_ms = 5;
        assert_eq!(base, fingerprint(&c), "the time is compared apart");
        assert!(same_time(0, 5) && same_time(5, 5) && !same_time(4, 5));
        let mut c = wine();
        c.description = Some(String::new());
        assert_ne!(
            base,
            fingerprint(&c),
            "an empty description is not no description"
        );
        // Moving text between fields changes it too.
        let mut a = wine();
        a.item_id = "ab".into();
        a.item_name = "c".into();
        let mut b = wine();
        b.item_id = "a".into();
        b.item_name = "bc".into();
        assert_ne!(fingerprint(&a), fingerprint(&b));
    }

    #[test]
    fn a_charge_must_fall_in_its_session_and_grace() {
        let f = facts();
        let now = 2_000_000;
        assert!(check_session("shop", "s-1", &f, now, now, DEFAULT_GRACE_MS).is_ok());
        let r = check_session("other", "s-1", &f, now, now, DEFAULT_GRACE_MS).unwrap_err();
        assert_eq!(r.outcome, Outcome::Forbidden);
        let r = check_session(
            "shop",
            "s-1",
            &f,
            1_000_000 - CLOCK_SKEW_MS - 1,
            now,
            DEFAULT_GRACE_MS,
        )
        .unwrap_err();
        assert!(
            r.message.contains("before session s-1 began"),
            "{}",
            r.message
        );
        let ended = SessionFacts {
            ended_at_ms: Some(1_500_000),
            state: CdrState::Ended,
            ..f.clone()
        };
        let last = 1_500_000 + DEFAULT_GRACE_MS;
        assert!(check_session("shop", "s-1", &ended, last, last, DEFAULT_GRACE_MS).is_ok());
        let r =
            check_session("shop", "s-1", &ended, last + 1, last + 1, DEFAULT_GRACE_MS).unwrap_err();
        assert_eq!(r.outcome, Outcome::Refused);
        assert!(r.message.contains("grace of 900 s"), "{}", r.message);
        let failed = SessionFacts {
            state: CdrState::Failed,
            ..f
        };
        let r = check_session("shop", "s-1", &failed, now, now, DEFAULT_GRACE_MS).unwrap_err();
        assert!(r.message.contains("never took place"), "{}", r.message);
    }

    #[test]
    fn limits_and_refunds() {
        let limits = Limits {
            max_charge_minor: Some(3000),
            max_session_charges_minor: Some(5000),
        };
        assert!(check_limits(2500, 2500, limits).is_ok());
        assert!(
            check_limits(3001, 0, limits)
                .unwrap_err()
                .message
                .contains("3000 a charge")
        );
        assert!(
            check_limits(2500, 2501, limits)
                .unwrap_err()
                .message
                .contains("5000 a session")
        );
        let mut refund = wine();
        refund.kind = Kind::Refund;
        refund.refunds = Some("k0".into());
        refund.quantity = 1;
        let target = Refunded {
            session_id: "s-1".into(),
            kind: Kind::Charge,
            currency: "EUR".into(),
            amount_minor: 2500,
            refunded_minor: 0,
        };
        assert!(check_refund(&refund, 1250, Some(&target)).is_ok());
        let spent = Refunded {
            refunded_minor: 1500,
            ..target.clone()
        };
        assert_eq!(
            check_refund(&refund, 1250, Some(&spent))
                .unwrap_err()
                .outcome,
            Outcome::Refused
        );
        assert_eq!(
            check_refund(&refund, 1250, None).unwrap_err().outcome,
            Outcome::NotFound
        );
    }

    #[test]
    fn the_fee_rounds_half_up_once_per_total() {
        assert_eq!(parse_fee_percent("2.5"), Ok(250));
        assert_eq!(parse_fee_percent("15"), Ok(1500));
        assert_eq!(parse_fee_percent("0.05"), Ok(5));
        assert!(parse_fee_percent("101").is_err());
        assert!(parse_fee_percent("2.555").is_err());
        assert!(parse_fee_percent("-1").is_err());
        // 2.5 % of 1.30 EUR is 3.25 cents: 3; of 1.50 EUR, 3.75: 4; of 1.00 EUR, 2.5: 3.
        assert_eq!(fee(130, 250), 3);
        assert_eq!(fee(150, 250), 4);
        assert_eq!(fee(100, 250), 3);
        assert_eq!(fee(0, 250), 0);
        assert_eq!(fee(i64::MAX, 10_000), i64::MAX);
    }
}
