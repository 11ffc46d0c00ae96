//! A user's statement and a vendor's settlement, computed from records and charges.
//!
//! Both are sums of their lines, per currency: a session's time charge (from its record), each
//! item, each refund (negative). The settlement's fee is the operator's share of the gross,
//! rounded half up once per currency total ([`super::fee`]); the net is gross - fee. Nothing
//! here reads the store or a clock.
use std::collections::BTreeMap;

use proto::charge::Kind;
use serde::Serialize;

use crate::store::{Cdr, ChargeRow};

/// One line of a statement or settlement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Line {
    /// `time`, `item` or `refund`.
    pub kind: &'static str,
    pub session_id: String,
    pub service: Option<String>,
    pub appserver: Option<String>,
    /// When the session began (time) or the item happened.
    pub at_ms: i64,
    pub item_id: Option<String>,
    pub item_name: Option<String>,
    pub quantity: i64,
    pub unit_price_minor: i64,
    /// Signed: a refund is negative.
    pub amount_minor: i64,
    pub currency: String,
    pub duration_ms: Option<i64>,
    pub billed_secs: Option<i64>,
}

/// The sums of one currency.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Total {
    pub currency: String,
    pub time_minor: i64,
    pub items_minor: i64,
    /// Positive: what was given back.
    pub refunds_minor: i64,
    /// time + items - refunds.
    pub total_minor: i64,
    /// Sessions with a time charge or an item in this currency.
    pub sessions: i64,
}

/// The lines of sessions and charges, oldest first, and their totals per currency.
pub fn lines(sessions: &[Cdr], charges: &[ChargeRow]) -> (Vec<Line>, Vec<Total>) {
    let mut out = Vec::new();
    for c in sessions {
        if let (Some(amount), Some(cur)) = (c.charge_minor, &c.currency) {
            out.push(Line {
                kind: "time",
                session_id: c.id.clone(),
                service: c.service.clone(),
                appserver: c.server.clone(),
                at_ms: c.started_at_ms.unwrap_or(c.created_at_ms),
                item_id: None,
                item_name: None,
                quantity: 1,
                unit_price_minor: amount,
                amount_minor: amount,
                currency: cur.clone(),
                duration_ms: c.duration_ms,
                billed_secs: c.billed_secs,
            });
        }
    }
    for ch in charges {
        out.push(Line {
            kind: match ch.kind {
                Kind::Charge => "item",
                Kind::Refund => "refund",
            },
            session_id: ch.session_id.clone(),
            service: ch.service.clone(),
            appserver: Some(ch.appserver.clone()),
            at_ms: ch.occurred_at_ms,
            item_id: Some(ch.item_id.clone()),
            item_name: Some(ch.item_name.clone()),
            quantity: ch.quantity,
            unit_price_minor: ch.unit_price_minor,
            amount_minor: ch.signed_minor(),
            currency: ch.currency.clone(),
            duration_ms: None,
            billed_secs: None,
        });
    }
    out.sort_by(|a, b| (a.at_ms, &a.session_id).cmp(&(b.at_ms, &b.session_id)));
    let totals = totals(&out);
    (out, totals)
}

/// Sums lines per currency (saturating: a ledger never wraps around).
pub fn totals(lines: &[Line]) -> Vec<Total> {
    let mut t: BTreeMap<&str, (Total, std::collections::BTreeSet<&str>)> = BTreeMap::new();
    for l in lines {
        let (e, sessions) = t.entry(&l.currency).or_insert_with(|| {
            (
                Total {
                    currency: l.currency.clone(),
                    ..Total::default()
                },
                Default::default(),
            )
        });
        match l.kind {
            "time" => e.time_minor = e.time_minor.saturating_add(l.amount_minor),
            "item" => e.items_minor = e.items_minor.saturating_add(l.amount_minor),
            _ => e.refunds_minor = e.refunds_minor.saturating_sub(l.amount_minor),
        }
        e.total_minor = e.total_minor.saturating_add(l.amount_minor);
        sessions.insert(&l.session_id);
    }
    t.into_values()
        .map(|(mut total, sessions)| {
            total.sessions = sessions.len() as i64;
            total
        })
        .collect()
}

/// A vendor's earnings in one currency.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Settled {
    #[serde(flatten)]
    pub total: Total,
    /// The operator's fee: round-half-up(gross x basis points / 10,000).
    pub fee_minor: i64,
    /// gross - fee.
    pub net_minor: i64,
}

/// Settles totals at the operator's fee.
pub fn settle(totals: Vec<Total>, fee_basis_points: i64) -> Vec<Settled> {
    totals
        .into_iter()
        .map(|t| {
            let fee = super::fee(t.total_minor, fee_basis_points);
            Settled {
                net_minor: t.total_minor.saturating_sub(fee),
                fee_minor: fee,
                total: t,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(session: &str, kind: Kind, amount: i64, cur: &str) -> ChargeRow {
        ChargeRow {
            id: format!("c-{session}-{amount}"),
            appserver: "shop".into(),
            idempotency_key: format!("k-{amount}"),
            session_id: session.into(),
            user: "alice".into(),
            service: Some("wine".into()),
            kind,
            refunds: None,
            item_id: "i".into(),
            item_name: "n".into(),
            description: None,
            unit_price_minor: amount,
            quantity: 1,
            amount_minor: amount,
            currency: cur.into(),
            occurred_at_ms: amount,
            recorded_at_ms: amount,
            channel: "grpc".into(),
        }
    }

    #[test]
    fn totals_are_the_sums_of_their_lines_per_currency() {
        let session = Cdr {
            id: "s1".into(),
            charge_minor: Some(240),
            currency: Some("EUR".into()),
            ..Cdr::default()
        };
        let charges = [
            item("s1", Kind::Charge, 2500, "EUR"),
            item("s1", Kind::Refund, 1250, "EUR"),
            item("s2", Kind::Charge, 300, "JPY"),
        ];
        let (lines, totals) = lines(std::slice::from_ref(&session), &charges);
        assert_eq!(lines.len(), 4);
        assert_eq!(
            totals[0],
            Total {
                currency: "EUR".into(),
                time_minor: 240,
                items_minor: 2500,
                refunds_minor: 1250,
                total_minor: 1490,
                sessions: 1,
            }
        );
        assert_eq!(
            (totals[1].currency.as_str(), totals[1].total_minor),
            ("JPY", 300)
        );
        let settled = settle(totals, 250);
        // 2.5 % of 14.90 EUR is 0.3725: 37 cents; the net is the rest.
        assert_eq!((settled[0].fee_minor, settled[0].net_minor), (37, 1453));
        // 2.5 % of 300 JPY is 7.5: 8.
        assert_eq!((settled[1].fee_minor, settled[1].net_minor), (8, 292));
    }
}
