//! The bill a client is told when its session ends: the session's items (application
//! charges) as a body beside the time charge in `Relay-Charge`.
use crate::core::Core;
use proto::sip::message;

/// The session's items (its application charges) as the bill its client is told, beside the
/// time charge in `Relay-Charge`; `None` when it has none.
pub(crate) async fn bill_json(core: &Core, sid: &str) -> Option<String> {
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
        lines: items
            .iter()
            .map(|c| proto::charge::BillLine {
                kind: c.kind.as_str().into(),
                name: c.item_name.clone(),
                quantity: c.quantity,
                amount_minor: c.signed_minor(),
                currency: c.currency.clone(),
            })
            .collect(),
    };
    Some(bill.to_json())
}

/// Puts the bill in an answer that has no body of its own.
pub(crate) async fn bill(core: &Core, sid: &str, resp: &mut message::Response) {
    if !resp.body.is_empty() {
        return;
    }
    if let Some(json) = bill_json(core, sid).await {
        resp.headers
            .set("Content-Type", proto::charge::BILL_CONTENT_TYPE);
        resp.body = json.into_bytes().into();
    }
}
