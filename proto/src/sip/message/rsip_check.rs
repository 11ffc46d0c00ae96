//! The rsip pass: once our own parsers have framed, unfolded and normalised a message, rsip
//! parses the normalised start line parts and core headers (method, Request-URI, CSeq, From and
//! To URIs) and must agree with what we read.
//!
//! rsip is only asked about what it gets right (research note, §2): URIs with an IPv6 host, or a
//! user part with characters rsip mis-splits (dots, `;`, `?`, `/`, `,`, `:`), are not shown to it;
//! URI parameters never are (it truncates values such as `gr=urn:uuid:…` and types
//! `method=`/`ttl=` strictly). Each part goes to rsip's own parser for it rather than through
//! `rsip::Request::try_from`, which costs about 1.5 µs per call in nom error formatting.

use super::{Method, ParseError, UriRef};
use rsip::prelude::{ToTypedHeader, UntypedHeader};

fn rsip_user_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-_+!~*'()&=$%".contains(&b)
}

/// `sip[s]:[user@]host[:port]` when rsip reads this URI right, `None` otherwise.
pub(super) fn view(uri: &UriRef<'_>) -> Option<String> {
    if !uri
        .host
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    {
        return None;
    }
    if let Some(user) = uri.user {
        if !user.bytes().all(rsip_user_byte) {
            return None;
        }
    }
    let mut s = String::with_capacity(16 + uri.host.len() + uri.user.map_or(0, str::len));
    s.push_str(if uri.secure { "sips:" } else { "sip:" });
    if let Some(user) = uri.user {
        s.push_str(user);
        s.push('@');
    }
    s.push_str(uri.host);
    if let Some(port) = uri.port {
        s.push(':');
        s.push_str(&port.to_string());
    }
    Some(s)
}

fn same_uri(ours: &UriRef<'_>, theirs: &rsip::Uri) -> bool {
    let scheme_ok = match theirs.scheme {
        Some(rsip::Scheme::Sip) => !ours.secure,
        Some(rsip::Scheme::Sips) => ours.secure,
        _ => false,
    };
    scheme_ok
        && theirs.user() == ours.user
        && theirs.host().to_string().eq_ignore_ascii_case(ours.host)
        && theirs.port().map(|p| *p.value()) == ours.port
}

pub(super) fn method_from_rsip(m: &rsip::Method) -> Method {
    match m {
        rsip::Method::Ack => Method::Ack,
        rsip::Method::Bye => Method::Bye,
        rsip::Method::Cancel => Method::Cancel,
        rsip::Method::Info => Method::Info,
        rsip::Method::Invite => Method::Invite,
        rsip::Method::Message => Method::Message,
        rsip::Method::Notify => Method::Notify,
        rsip::Method::Options => Method::Options,
        rsip::Method::PRack => Method::Prack,
        rsip::Method::Publish => Method::Publish,
        rsip::Method::Refer => Method::Refer,
        rsip::Method::Register => Method::Register,
        rsip::Method::Subscribe => Method::Subscribe,
        rsip::Method::Update => Method::Update,
    }
}

/// What the rsip pass looks at besides the start line.
pub(super) struct Core<'a> {
    pub(super) seq: u32,
    pub(super) cseq_method: Method,
    pub(super) from: Option<&'a UriRef<'a>>,
    pub(super) to: Option<&'a UriRef<'a>>,
}

fn fail() -> ParseError {
    ParseError::bad("Malformed start line or core header")
}

/// A URI rsip reads right must read the same to rsip; others are skipped.
pub(super) fn check_uri(uri: &UriRef<'_>) -> Result<(), ParseError> {
    let Some(view) = view(uri) else { return Ok(()) };
    let theirs = rsip::Uri::try_from(view.as_str()).map_err(|_| fail())?;
    if same_uri(uri, &theirs) {
        Ok(())
    } else {
        Err(fail())
    }
}

fn check_method(method: Method) -> Result<(), ParseError> {
    let theirs: rsip::Method = method.as_str().parse().map_err(|_| fail())?;
    if method_from_rsip(&theirs) == method {
        Ok(())
    } else {
        Err(fail())
    }
}

fn check_core(core: &Core<'_>) -> Result<(), ParseError> {
    let cseq = rsip::headers::CSeq::new(format!("{} {}", core.seq, core.cseq_method))
        .typed()
        .map_err(|_| fail())?;
    if cseq.seq != core.seq || method_from_rsip(&cseq.method) != core.cseq_method {
        return Err(fail());
    }
    for uri in [core.from, core.to].into_iter().flatten() {
        check_uri(uri)?;
    }
    Ok(())
}

pub(super) fn check_request(
    method: Method,
    uri: &UriRef<'_>,
    core: &Core<'_>,
) -> Result<(), ParseError> {
    check_method(method)?;
    check_uri(uri)?;
    check_core(core)
}

pub(super) fn check_response(core: &Core<'_>) -> Result<(), ParseError> {
    check_core(core)
}
