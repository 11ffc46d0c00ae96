//! Dialogs (RFC 3261 §12) from the user agent's side: the state a UA keeps to send ACK, BYE and
//! other requests inside a session, built from the INVITE and its 2xx.

use crate::sip::message::{self, Headers, Method, NameAddr, Request, Response, Uri};

/// One dialog as its UA sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dialog {
    pub call_id: String,
    pub local_tag: String,
    pub remote_tag: String,
    /// Our From (UAC) or To (UAS) header value.
    pub local: String,
    /// The peer's header value.
    pub remote: String,
    pub local_seq: u32,
    /// Where in-dialog requests go: the peer's Contact.
    pub remote_target: Uri,
    /// Route headers for in-dialog requests, in order.
    pub route_set: Vec<String>,
    /// Our Contact header value.
    pub local_contact: String,
}

impl Dialog {
    /// The UAC's dialog from its INVITE and a 2xx (or 1xx with a To tag): the route set is the
    /// response's Record-Route in reverse order (RFC 3261 §12.1.2).
    pub fn uac(invite: &Request, resp: &Response) -> Option<Dialog> {
        let to = resp.to().ok()?;
        let remote_tag = to.tag()?.to_string();
        let from = invite.from().ok()?;
        let local_tag = from.tag()?.to_string();
        let contact = match message::contacts(&resp.headers).ok()?.into_iter().next()? {
            message::Contact::Addr(na) => na.uri,
            message::Contact::Star => return None,
        };
        let mut route_set: Vec<String> = resp
            .headers
            .get_all("Record-Route")
            .map(str::to_string)
            .collect();
        route_set.reverse();
        Some(Dialog {
            call_id: invite.call_id()?.to_string(),
            local_tag,
            remote_tag,
            local: invite.headers.get("From")?.to_string(),
            remote: resp.headers.get("To")?.to_string(),
            local_seq: invite.cseq().ok()?.seq,
            remote_target: contact,
            route_set,
            local_contact: invite
                .headers
                .get("Contact")
                .unwrap_or_default()
                .to_string(),
        })
    }

    /// The UAS's dialog from a received INVITE and the To tag it answers with.
    pub fn uas(invite: &Request, local_tag: &str, local_contact: &str) -> Option<Dialog> {
        let from = invite.from().ok()?;
        let contact = match message::contacts(&invite.headers)
            .ok()?
            .into_iter()
            .next()?
        {
            message::Contact::Addr(na) => na.uri,
            message::Contact::Star => return None,
        };
        let mut to = invite.to().ok()?;
        to.set_param("tag", Some(local_tag));
        Some(Dialog {
            call_id: invite.call_id()?.to_string(),
            local_tag: local_tag.to_string(),
            remote_tag: from.tag()?.to_string(),
            local: to.to_string(),
            remote: invite.headers.get("From")?.to_string(),
            local_seq: 0,
            remote_target: contact,
            route_set: invite
                .headers
                .get_all("Record-Route")
                .map(str::to_string)
                .collect(),
            local_contact: local_contact.to_string(),
        })
    }

    /// A new request in this dialog with the next CSeq (no Via: the sender adds it).
    pub fn request(&mut self, method: Method) -> Request {
        self.local_seq += 1;
        self.build(method, self.local_seq)
    }

    /// The ACK for a 2xx to the INVITE with CSeq `invite_seq` (RFC 3261 §13.2.2.4).
    pub fn ack(&self, invite_seq: u32) -> Request {
        self.build(Method::Ack, invite_seq)
    }

    fn build(&self, method: Method, seq: u32) -> Request {
        let mut headers = Headers::default();
        for r in &self.route_set {
            headers.push("Route", r.as_str());
        }
        headers.push("Max-Forwards", "70");
        headers.push("From", self.local.as_str());
        headers.push("To", self.remote.as_str());
        headers.push("Call-ID", self.call_id.as_str());
        headers.push("CSeq", format!("{seq} {method}"));
        if !self.local_contact.is_empty() && matches!(method, Method::Invite | Method::Update) {
            headers.push("Contact", self.local_contact.as_str());
        }
        Request {
            method,
            uri: self.remote_target.clone(),
            headers,
            body: Default::default(),
        }
    }

    /// The URI of the next hop: the first route, else the remote target.
    pub fn next_hop(&self) -> Option<Uri> {
        match self.route_set.first() {
            Some(r) => NameAddr::parse(r).ok().map(|na| na.uri),
            None => Some(self.remote_target.clone()),
        }
    }

    /// Whether a received request belongs to this dialog.
    pub fn matches(&self, req: &Request) -> bool {
        let (Ok(from), Ok(to)) = (req.from(), req.to()) else {
            return false;
        };
        req.call_id() == Some(self.call_id.as_str())
            && from.tag() == Some(self.remote_tag.as_str())
            && to.tag() == Some(self.local_tag.as_str())
    }
}
