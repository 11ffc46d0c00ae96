//! gRPC contracts, generated at build time from `proto/proto/relay/v1/*.proto`.
//!
//! `relay.v1.Billing` is the contract of the relay's billing endpoint (application charges). The
//! message types and the service traits are defined here; serving it is not built yet.

/// Package `relay.v1`.
pub mod relay_v1 {
    #![allow(clippy::all, unreachable_pub, missing_docs)]
    tonic::include_proto!("relay.v1");
}

#[cfg(test)]
mod tests {
    use super::relay_v1::{ChargeItem, ReportChargesRequest};
    use prost::Message;

    #[test]
    fn a_charge_report_survives_the_wire() {
        let req = ReportChargesRequest {
            idempotency_key: "order-4711".into(),
            session_id: "s-1".into(),
            occurred_at_ms: 1_795_000_000_000,
            items: vec![ChargeItem {
                article_id: "wine-12".into(),
                description: "Riesling 2019".into(),
                unit_price_minor: 1_250,
                currency: "EUR".into(),
                quantity: -2,
            }],
        };
        let bytes = req.encode_to_vec();
        assert_eq!(ReportChargesRequest::decode(bytes.as_slice()).unwrap(), req);
        // Money stays integral: a negative quantity (refund) and minor units survive exactly.
        assert_eq!(
            ReportChargesRequest::decode(bytes.as_slice())
                .unwrap()
                .items[0]
                .unit_price_minor,
            1_250
        );
    }
}
