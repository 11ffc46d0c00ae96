//! gRPC contracts, generated at build time from `proto/proto/relay/v1/*.proto`, and their
//! conversions to and from the [`crate::charge`] document every other channel carries.
//!
//! `relay.v1.Billing` is the contract of the relay's billing endpoint: the relay serves it, the
//! app-server-agent calls it.

/// Package `relay.v1`.
pub mod relay_v1 {
    #![allow(clippy::all, unreachable_pub, missing_docs)]
    tonic::include_proto!("relay.v1");
}

/// The encoded descriptor set of `relay.v1`, for gRPC reflection.
pub const DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/relay_v1_descriptor.bin"));

use crate::charge::{self, Kind, Outcome};
use relay_v1 as v1;

impl From<v1::Charge> for charge::Charge {
    fn from(c: v1::Charge) -> charge::Charge {
        charge::Charge {
            session_id: c.session_id,
            idempotency_key: c.idempotency_key,
            item_id: c.item_id,
            item_name: c.item_name,
            unit_price_minor: c.unit_price_minor,
            quantity: c.quantity,
            currency: c.currency,
            occurred_at_ms: c.occurred_at_ms,
            description: c.description,
            kind: if c.kind == v1::ChargeKind::Refund as i32 {
                Kind::Refund
            } else {
                Kind::Charge
            },
            refunds: c.refunds,
        }
    }
}

impl From<charge::Charge> for v1::Charge {
    fn from(c: charge::Charge) -> v1::Charge {
        v1::Charge {
            session_id: c.session_id,
            idempotency_key: c.idempotency_key,
            item_id: c.item_id,
            item_name: c.item_name,
            unit_price_minor: c.unit_price_minor,
            quantity: c.quantity,
            currency: c.currency,
            occurred_at_ms: c.occurred_at_ms,
            description: c.description,
            kind: match c.kind {
                Kind::Charge => v1::ChargeKind::Charge as i32,
                Kind::Refund => v1::ChargeKind::Refund as i32,
            },
            refunds: c.refunds,
        }
    }
}

/// Whether a gRPC charge names a kind this contract knows.
pub fn known_kind(c: &v1::Charge) -> bool {
    v1::ChargeKind::try_from(c.kind).is_ok()
}

fn outcome_to_v1(o: Outcome) -> v1::Outcome {
    match o {
        Outcome::Recorded => v1::Outcome::Recorded,
        Outcome::Duplicate => v1::Outcome::Duplicate,
        Outcome::Conflict => v1::Outcome::Conflict,
        Outcome::Invalid => v1::Outcome::Invalid,
        Outcome::NotFound => v1::Outcome::NotFound,
        Outcome::Forbidden => v1::Outcome::Forbidden,
        Outcome::Refused => v1::Outcome::Refused,
    }
}

impl From<charge::ChargeResult> for v1::ChargeResult {
    fn from(r: charge::ChargeResult) -> v1::ChargeResult {
        v1::ChargeResult {
            idempotency_key: r.idempotency_key,
            outcome: outcome_to_v1(r.outcome) as i32,
            charge_id: r.charge_id.unwrap_or_default(),
            amount_minor: r.amount_minor.unwrap_or_default(),
            recorded_at_ms: r.recorded_at_ms.unwrap_or_default(),
            message: r.message.unwrap_or_default(),
        }
    }
}

/// A gRPC result as the charge document's; `None` for an outcome this side does not know.
pub fn result_from_v1(r: v1::ChargeResult) -> Option<charge::ChargeResult> {
    let outcome = match v1::Outcome::try_from(r.outcome).ok()? {
        v1::Outcome::Recorded => Outcome::Recorded,
        v1::Outcome::Duplicate => Outcome::Duplicate,
        v1::Outcome::Conflict => Outcome::Conflict,
        v1::Outcome::Invalid => Outcome::Invalid,
        v1::Outcome::NotFound => Outcome::NotFound,
        v1::Outcome::Forbidden => Outcome::Forbidden,
        v1::Outcome::Refused => Outcome::Refused,
        v1::Outcome::Unspecified => return None,
    };
    let recorded = outcome.is_recorded();
    Some(charge::ChargeResult {
        idempotency_key: r.idempotency_key,
        outcome,
        charge_id: recorded.then_some(r.charge_id),
        amount_minor: recorded.then_some(r.amount_minor),
        recorded_at_ms: recorded.then_some(r.recorded_at_ms),
        message: (!r.message.is_empty()).then_some(r.message),
    })
}

#[cfg(test)]
mod tests {
    use super::relay_v1::{Charge, ChargeKind, ReportChargesRequest};
    use prost::Message;

    #[test]
    fn a_charge_report_survives_the_wire_and_the_document() {
        let req = ReportChargesRequest {
            charges: vec![Charge {
                session_id: "s-1".into(),
                idempotency_key: "order-4711".into(),
                item_id: "wine-12".into(),
                item_name: "Riesling 2019".into(),
                unit_price_minor: 1_250,
                quantity: 2,
                currency: "EUR".into(),
                occurred_at_ms: 1_795_000_000_000,
                description: None,
                kind: ChargeKind::Refund as i32,
                refunds: Some("order-4710".into()),
            }],
        };
        let bytes = req.encode_to_vec();
        let back = ReportChargesRequest::decode(bytes.as_slice()).unwrap();
        assert_eq!(back, req);
        let doc: crate::charge::Charge = back.charges[0].clone().into();
        assert_eq!(doc.kind, crate::charge::Kind::Refund);
        assert_eq!(doc.refunds.as_deref(), Some("order-4710"));
        assert_eq!(Charge::from(doc), req.charges[0]);
    }
}
