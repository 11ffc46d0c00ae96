//! The bill a client is told when its session ends: the session's items (application
//! charges) in `Relay-Bill`, beside the time charge in `Relay-Charge`.
use crate::core::Core;
use proto::charge::{BILL_HEADER, MAX_BILL_LINES};
use proto::sip::message;

/// The session's items (its application charges) as the `Relay-Bill` value its client is
/// told; `None` when it has none.
pub(crate) async fn bill_header(core: &Core, sid: &str) -> Option<String> {
    let items = match core.store.session_charges(sid).await {
        Ok(items) if !items.is_empty() => items,
        Ok(_) => return None,
        Err(e) => {
            tracing::warn!(%sid, error = %e, "The session's items could not be read for its bill");
            return None;
        }
    };
    let bill = proto::charge::Bill {
        session_id: sid.to_string(),
        more: items.len().saturating_sub(MAX_BILL_LINES),
        lines: items
            .iter()
            .take(MAX_BILL_LINES)
            .map(|c| proto::charge::BillLine {
                kind: c.kind.as_str().into(),
                name: c.item_name.clone(),
                quantity: c.quantity,
                amount_minor: c.signed_minor(),
                currency: c.currency.clone(),
            })
            .collect(),
    };
    Some(bill.to_header())
}

/// Puts the bill in an answer.
pub(crate) async fn bill(core: &Core, sid: &str, resp: &mut message::Response) {
    if let Some(value) = bill_header(core, sid).await {
        resp.headers.set(BILL_HEADER, value);
    }
}
