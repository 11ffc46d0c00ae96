//! What the lookups before relaying decide ([`Decision`]), handed to the inquiry: the kind of
//! request, the attempt behind it, the fork mode, and what to do. Plain data.

use crate::session::{Attempt, BranchInfo, DialogKey, ServiceInfo};
use crate::store::Fork;
use proto::sip::message::{Request, Response};
use proto::transport::Target;

/// What kind of request this is, for session control.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// An authenticated INVITE: an attempt that leaves exactly one record.
    Invite,
    /// A BYE inside a dialog the relay knows.
    Bye {
        call_id: String,
        from_tag: String,
        to_tag: String,
    },
    /// A re-INVITE or UPDATE changing the service of a session (`service` once answered 2xx).
    Change {
        key: DialogKey,
        service: Box<ServiceInfo>,
    },
    /// A request passed on to an additional server (a client following a redirect through
    /// this relay): no record, no Record-Route.
    Pass,
    Other,
}

/// A copy of a request to forward, where to, and for which service session.
#[derive(Debug)]
pub struct Forward {
    pub req: Request,
    pub target: Target,
    pub info: Option<BranchInfo>,
}

impl Forward {
    pub fn plain(req: Request, target: Target) -> Forward {
        Forward {
            req,
            target,
            info: None,
        }
    }
}

/// What the lookups before the inquiry decided.
#[derive(Debug)]
pub struct Decision {
    pub kind: Kind,
    /// Set once an INVITE's caller is authenticated: from then on it leaves one record.
    pub attempt: Option<Attempt>,
    pub fork: Fork,
    /// An in-dialog request whose CSeq the relay shifted: answers get this one back.
    pub original_cseq: Option<String>,
    pub action: Action,
}

/// What to do with the request.
#[derive(Debug)]
pub enum Action {
    /// Forward these copies (in this order for `sequential`).
    Forward(Vec<Forward>),
    /// Answer with this response.
    Answer(Response),
    /// Redirect the attempt to an additional server: 302 with this Contact; the record says
    /// `redirected`.
    Redirect { contact: String },
    /// Refuse the attempt: `status` and `phrase` to the caller; the record says `reason`
    /// (derived from the status when `None`).
    Refuse {
        status: u16,
        phrase: Option<String>,
        reason: Option<&'static str>,
    },
}
