//! SIP messages: the only module that uses `rsip`.
//!
//! Input goes through our own framing and normalisation first (unfolding, compact header names,
//! comma-separated Via/Route/Record-Route/Contact split into one header each, Content-Length
//! enforced, size caps), then rsip validates the grammar of the start line and the main headers.
//! Fields rsip mis-reads (Via `received`/`rport`, IPv6 hosts, Contact `+sip.instance`/`expires`,
//! user parts with dots) are read by the small parsers here. Serialisation is ours: raw body bytes,
//! our reason phrases, a recomputed Content-Length.
//!
//! Callers never see a half-parsed message: `parse` either returns a whole [`Message`] or a
//! [`ParseError`] that says which status to answer with, plus what is needed to answer.

use bytes::Bytes;
use std::borrow::Cow;
use std::fmt;
use std::net::Ipv6Addr;

mod framing;
mod grammar;
mod rsip_check;
#[cfg(test)]
mod tests;

use grammar::{
    find_param, is_call_id, is_hostname, is_list_header, is_scheme, is_token, is_token_byte,
    is_unreserved, is_wsp, lookup_name, parse_params, quoted_end, set_param, split_list,
    trim_end_wsp, trim_start_wsp, trim_wsp, valid_escaped, walk_params,
};

/// Caps applied to every message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest whole message (start line + headers + body), in bytes.
    pub max_message: usize,
    /// Most header lines (after splitting comma lists).
    pub max_headers: usize,
    /// Longest single (unfolded) header line, in bytes.
    pub max_line: usize,
}

impl Limits {
    /// Caps for a UDP datagram: up to 65,535 bytes.
    pub const UDP: Limits = Limits {
        max_message: 65_535,
        max_headers: 256,
        max_line: 16_384,
    };
}

impl Default for Limits {
    fn default() -> Self {
        Limits::UDP
    }
}

/// A request method. Unknown methods are not representable: `parse` answers them with 501.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    Invite,
    Ack,
    Bye,
    Cancel,
    Register,
    Options,
    Info,
    Update,
    Prack,
    Subscribe,
    Notify,
    Refer,
    Message,
    Publish,
}

impl Method {
    pub fn as_str(&self) -> &'static str {
        match self {
            Method::Invite => "INVITE",
            Method::Ack => "ACK",
            Method::Bye => "BYE",
            Method::Cancel => "CANCEL",
            Method::Register => "REGISTER",
            Method::Options => "OPTIONS",
            Method::Info => "INFO",
            Method::Update => "UPDATE",
            Method::Prack => "PRACK",
            Method::Subscribe => "SUBSCRIBE",
            Method::Notify => "NOTIFY",
            Method::Refer => "REFER",
            Method::Message => "MESSAGE",
            Method::Publish => "PUBLISH",
        }
    }
    /// Case-sensitive, as RFC 3261 says method names are.
    pub fn from_token(s: &str) -> Option<Method> {
        Some(match s {
            "INVITE" => Method::Invite,
            "ACK" => Method::Ack,
            "BYE" => Method::Bye,
            "CANCEL" => Method::Cancel,
            "REGISTER" => Method::Register,
            "OPTIONS" => Method::Options,
            "INFO" => Method::Info,
            "UPDATE" => Method::Update,
            "PRACK" => Method::Prack,
            "SUBSCRIBE" => Method::Subscribe,
            "NOTIFY" => Method::Notify,
            "REFER" => Method::Refer,
            "MESSAGE" => Method::Message,
            "PUBLISH" => Method::Publish,
            _ => return None,
        })
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A SIP or SIPS URI (`tel:` and others are refused by `Uri::parse`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uri {
    /// true for `sips:`.
    pub secure: bool,
    /// User part, still percent-encoded as received (dots allowed).
    /// A password, if the URI carries one (deprecated), stays here as `user:password`.
    pub user: Option<String>,
    /// Host as written: a name, an IPv4 literal, or an IPv6 reference with its brackets.
    pub host: String,
    pub port: Option<u16>,
    /// URI parameters in order; names as written, compare case-insensitively.
    pub params: Vec<(String, Option<String>)>,
    /// Raw `?headers` part without the `?`, if any.
    pub headers: Option<String>,
}

/// `param-unreserved` / unreserved (escapes handled by `valid_escaped`).
fn is_paramchar(b: u8) -> bool {
    is_unreserved(b) || matches!(b, b'[' | b']' | b'/' | b':' | b'&' | b'+' | b'$')
}

fn parse_port(s: &str) -> Result<u16, ParseError> {
    if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ParseError::bad("Bad port"));
    }
    s.parse::<u16>().map_err(|_| ParseError::bad("Bad port"))
}

/// `host [":" port]` of a URI (no LWS allowed); the host keeps IPv6 brackets.
fn parse_hostport(s: &str) -> Result<(&str, Option<u16>), ParseError> {
    if let Some(inner) = s.strip_prefix('[') {
        let (addr, after) = inner
            .split_once(']')
            .ok_or_else(|| ParseError::bad("Bad IPv6 reference"))?;
        addr.parse::<Ipv6Addr>()
            .map_err(|_| ParseError::bad("Bad IPv6 reference"))?;
        let port = match after {
            "" => None,
            _ => Some(parse_port(
                after
                    .strip_prefix(':')
                    .ok_or_else(|| ParseError::bad("Bad host"))?,
            )?),
        };
        let host = s
            .get(..addr.len() + 2)
            .ok_or_else(|| ParseError::bad("Bad host"))?;
        return Ok((host, port));
    }
    let (host, port) = match s.split_once(':') {
        Some((h, p)) => (h, Some(parse_port(p)?)),
        None => (s, None),
    };
    if !is_hostname(host) {
        return Err(ParseError::bad("Bad host"));
    }
    Ok((host, port))
}

/// A checked SIP URI borrowing from the input (validation without allocation).
struct UriRef<'a> {
    secure: bool,
    user: Option<&'a str>,
    host: &'a str,
    port: Option<u16>,
    /// Text after the first `;` (checked), if any.
    params: Option<&'a str>,
    headers: Option<&'a str>,
}

impl<'a> UriRef<'a> {
    fn parse(s: &'a str) -> Result<UriRef<'a>, ParseError> {
        let (scheme, rest) = s
            .split_once(':')
            .ok_or_else(|| ParseError::bad("URI without scheme"))?;
        let secure = if scheme.eq_ignore_ascii_case("sip") {
            false
        } else if scheme.eq_ignore_ascii_case("sips") {
            true
        } else if is_scheme(scheme) {
            return Err(ParseError::new(416, "Unsupported URI Scheme"));
        } else {
            return Err(ParseError::bad("Bad URI scheme"));
        };
        // A SIP URI holds at most one unescaped '@': the end of the userinfo.
        let (user, hostpart) = match rest.split_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, rest),
        };
        if hostpart.contains('@') {
            return Err(ParseError::bad("Bad URI"));
        }
        if let Some(ui) = user {
            let (user, password) = match ui.split_once(':') {
                Some((u, p)) => (u, Some(p)),
                None => (ui, None),
            };
            let user_ok = !user.is_empty()
                && valid_escaped(user, |b| {
                    is_unreserved(b)
                        || matches!(b, b'&' | b'=' | b'+' | b'$' | b',' | b';' | b'?' | b'/')
                });
            let password_ok = password.is_none_or(|p| {
                valid_escaped(p, |b| {
                    is_unreserved(b) || matches!(b, b'&' | b'=' | b'+' | b'$' | b',')
                })
            });
            if !user_ok || !password_ok {
                return Err(ParseError::bad("Bad URI user part"));
            }
        }
        let (before_headers, headers) = match hostpart.split_once('?') {
            Some((b, h)) => (b, Some(h)),
            None => (hostpart, None),
        };
        let (hostport, params) = match before_headers.split_once(';') {
            Some((h, p)) => (h, Some(p)),
            None => (before_headers, None),
        };
        let (host, port) = parse_hostport(hostport)?;
        for p in params.into_iter().flat_map(|ps| ps.split(';')) {
            let (name, value) = match p.split_once('=') {
                Some((n, v)) => (n, Some(v)),
                None => (p, None),
            };
            if name.is_empty()
                || !valid_escaped(name, is_paramchar)
                || value.is_some_and(|v| v.is_empty() || !valid_escaped(v, is_paramchar))
            {
                return Err(ParseError::bad("Bad URI parameter"));
            }
        }
        if let Some(h) = headers {
            let ok = !h.is_empty()
                && valid_escaped(h, |b| {
                    is_unreserved(b)
                        || matches!(
                            b,
                            b'[' | b']' | b'/' | b'?' | b':' | b'+' | b'$' | b'=' | b'&'
                        )
                });
            if !ok {
                return Err(ParseError::bad("Bad URI headers"));
            }
        }
        Ok(UriRef {
            secure,
            user,
            host,
            port,
            params,
            headers,
        })
    }

    fn to_uri(&self) -> Uri {
        let params = self
            .params
            .into_iter()
            .flat_map(|ps| ps.split(';'))
            .map(|p| match p.split_once('=') {
                Some((n, v)) => (n.to_string(), Some(v.to_string())),
                None => (p.to_string(), None),
            })
            .collect();
        Uri {
            secure: self.secure,
            user: self.user.map(str::to_string),
            host: self.host.to_string(),
            port: self.port,
            params,
            headers: self.headers.map(str::to_string),
        }
    }
}

impl Uri {
    pub fn parse(s: &str) -> Result<Uri, ParseError> {
        UriRef::parse(s).map(|u| u.to_uri())
    }
    /// Value of a URI parameter (case-insensitive name); `Some(None)` for a flag such as `lr`.
    pub fn param(&self, name: &str) -> Option<Option<&str>> {
        find_param(&self.params, name)
    }
    /// Host without IPv6 brackets, lower-cased, for comparisons.
    pub fn host_key(&self) -> String {
        let h = self
            .host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(&self.host);
        h.to_ascii_lowercase()
    }
    /// `transport` parameter lower-cased, if any.
    pub fn transport(&self) -> Option<String> {
        self.param("transport")
            .flatten()
            .map(str::to_ascii_lowercase)
    }
    /// Sets or replaces a URI parameter (e.g. `lr`, `transport`).
    pub fn set_param(&mut self, name: &str, value: Option<&str>) {
        set_param(&mut self.params, name, value)
    }
}

/// Writes a host, adding brackets to a bare IPv6 literal.
fn write_host(f: &mut fmt::Formatter<'_>, host: &str) -> fmt::Result {
    if host.contains(':') && !host.starts_with('[') {
        write!(f, "[{host}]")
    } else {
        f.write_str(host)
    }
}

fn write_params(f: &mut fmt::Formatter<'_>, params: &[(String, Option<String>)]) -> fmt::Result {
    for (name, value) in params {
        f.write_str(";")?;
        f.write_str(name)?;
        if let Some(v) = value {
            f.write_str("=")?;
            f.write_str(v)?;
        }
    }
    Ok(())
}

impl fmt::Display for Uri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.secure { "sips:" } else { "sip:" })?;
        if let Some(user) = &self.user {
            f.write_str(user)?;
            f.write_str("@")?;
        }
        write_host(f, &self.host)?;
        if let Some(port) = self.port {
            write!(f, ":{port}")?;
        }
        write_params(f, &self.params)?;
        if let Some(h) = &self.headers {
            write!(f, "?{h}")?;
        }
        Ok(())
    }
}

/// `display-name <uri>;params` or `uri;params` (From, To, Contact, Route, Record-Route, Refer-To).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameAddr {
    /// Display name as written (quotes kept), if any.
    pub display: Option<String>,
    pub uri: Uri,
    /// Header parameters (after the URI), e.g. `tag`, `expires`, `q`, `+sip.instance`.
    pub params: Vec<(String, Option<String>)>,
}

/// The three parts of a name-addr / addr-spec header value: display name (as written), URI
/// text, and the header-parameter text after it.
struct RawNameAddr<'a> {
    display: Option<&'a str>,
    uri: &'a str,
    params: &'a str,
}

fn split_name_addr(s: &str) -> Result<RawNameAddr<'_>, ParseError> {
    let s = trim_wsp(s);
    if s.starts_with('"') {
        let end = quoted_end(s.as_bytes(), 0)?;
        let (display, rest) = s.split_at(end);
        let inner = trim_start_wsp(rest)
            .strip_prefix('<')
            .ok_or_else(|| ParseError::bad("Expected <"))?;
        let (uri, params) = inner
            .split_once('>')
            .ok_or_else(|| ParseError::bad("Missing >"))?;
        return Ok(RawNameAddr {
            display: Some(display),
            uri,
            params,
        });
    }
    let lt = s.find('<');
    let semi = s.find(';');
    match lt {
        Some(lt) if semi.is_none_or(|semi| lt < semi) => {
            let (display, rest) = s.split_at(lt);
            let display = trim_end_wsp(display);
            if !display.bytes().all(|b| is_token_byte(b) || is_wsp(b)) {
                return Err(ParseError::bad("Bad display name"));
            }
            let inner = rest.strip_prefix('<').unwrap_or(rest);
            let (uri, params) = inner
                .split_once('>')
                .ok_or_else(|| ParseError::bad("Missing >"))?;
            Ok(RawNameAddr {
                display: (!display.is_empty()).then_some(display),
                uri,
                params,
            })
        }
        _ => {
            // addr-spec: the URI cannot hold ';', ',', '?' or LWS (RFC 3261 §20).
            let end = s.find([';', ' ', '\t']).unwrap_or(s.len());
            let (uri, params) = s.split_at(end);
            if uri.contains(['?', ',', '>', '"']) {
                return Err(ParseError::bad("addr-spec needs <>"));
            }
            Ok(RawNameAddr {
                display: None,
                uri,
                params,
            })
        }
    }
}

/// Syntax check of a URI in any scheme (sip/sips fully parsed).
fn check_any_uri(s: &str) -> Result<Option<UriRef<'_>>, ParseError> {
    match s.split_once(':') {
        Some((scheme, _))
            if scheme.eq_ignore_ascii_case("sip") || scheme.eq_ignore_ascii_case("sips") =>
        {
            UriRef::parse(s).map(Some)
        }
        Some((scheme, rest))
            if is_scheme(scheme)
                && !rest.is_empty()
                && rest
                    .bytes()
                    .all(|b| b > 0x20 && b < 0x7f && !matches!(b, b'<' | b'>' | b'"')) =>
        {
            Ok(None)
        }
        _ => Err(ParseError::bad("Bad URI")),
    }
}

/// Validates a name-addr of any URI scheme; returns the SIP URI when it is one.
fn check_name_addr(s: &str) -> Result<Option<UriRef<'_>>, ParseError> {
    let raw = split_name_addr(s)?;
    let uri = check_any_uri(raw.uri)?;
    walk_params(raw.params, |_, _| {})?;
    Ok(uri)
}

impl NameAddr {
    pub fn parse(s: &str) -> Result<NameAddr, ParseError> {
        let raw = split_name_addr(s)?;
        let uri = Uri::parse(raw.uri)?;
        let params = parse_params(raw.params)?;
        Ok(NameAddr {
            display: raw.display.map(str::to_string),
            uri,
            params,
        })
    }
    pub fn param(&self, name: &str) -> Option<Option<&str>> {
        find_param(&self.params, name)
    }
    pub fn tag(&self) -> Option<&str> {
        self.param("tag").flatten()
    }
    /// Sets or replaces a header parameter.
    pub fn set_param(&mut self, name: &str, value: Option<&str>) {
        set_param(&mut self.params, name, value)
    }
}

/// Always prints the `<uri>` form, so URI parameters never mix with header parameters.
impl fmt::Display for NameAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(d) = &self.display {
            write!(f, "{d} ")?;
        }
        write!(f, "<{}>", self.uri)?;
        write_params(f, &self.params)
    }
}

/// One Contact header value: `*` or a name-addr.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Contact {
    Star,
    Addr(NameAddr),
}

impl Contact {
    pub fn parse(s: &str) -> Result<Contact, ParseError> {
        if trim_wsp(s) == "*" {
            return Ok(Contact::Star);
        }
        NameAddr::parse(s).map(Contact::Addr)
    }
    /// The `expires` parameter, if present and a number (values past `u32::MAX` saturate, as
    /// RFC 3261 §20.19 says).
    pub fn expires(&self) -> Option<u32> {
        let Contact::Addr(na) = self else { return None };
        let v = na.param("expires").flatten()?;
        if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        Some(v.parse::<u32>().unwrap_or(u32::MAX))
    }
    /// The `+sip.instance` parameter without its quotes, if any.
    pub fn instance(&self) -> Option<String> {
        let Contact::Addr(na) = self else { return None };
        let v = na.param("+sip.instance").flatten()?;
        let v = v
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or(v);
        Some(v.to_string())
    }
}

impl fmt::Display for Contact {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Contact::Star => f.write_str("*"),
            Contact::Addr(na) => na.fmt(f),
        }
    }
}

/// Transport named in a Via.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    Udp,
    Tcp,
    Tls,
    Sctp,
    Ws,
    Wss,
}

impl Transport {
    pub fn as_str(&self) -> &'static str {
        match self {
            Transport::Udp => "UDP",
            Transport::Tcp => "TCP",
            Transport::Tls => "TLS",
            Transport::Sctp => "SCTP",
            Transport::Ws => "WS",
            Transport::Wss => "WSS",
        }
    }
    pub fn parse(s: &str) -> Option<Transport> {
        [
            Transport::Udp,
            Transport::Tcp,
            Transport::Tls,
            Transport::Sctp,
            Transport::Ws,
            Transport::Wss,
        ]
        .into_iter()
        .find(|t| t.as_str().eq_ignore_ascii_case(s))
    }
    /// Reliable transports get no retransmissions.
    pub fn is_reliable(&self) -> bool {
        !matches!(self, Transport::Udp)
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One Via header value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Via {
    pub transport: Transport,
    /// sent-by host as written (IPv6 with brackets).
    pub host: String,
    pub port: Option<u16>,
    /// Parameters in order (branch, received, rport, ...).
    pub params: Vec<(String, Option<String>)>,
}

/// A Via value split into transport token, sent-by and parameter text. LWS is allowed around
/// `/`, `:` and `;` (RFC 3261 §25.1 SLASH, COLON, SEMI).
struct RawVia<'a> {
    transport: &'a str,
    host: &'a str,
    port: Option<u16>,
    params: &'a str,
}

fn split_via(s: &str) -> Result<RawVia<'_>, ParseError> {
    let bad = || ParseError::bad("Bad Via");
    let (name, rest) = s.split_once('/').ok_or_else(bad)?;
    let (version, rest) = rest.split_once('/').ok_or_else(bad)?;
    if !trim_wsp(name).eq_ignore_ascii_case("SIP") || trim_wsp(version) != "2.0" {
        return Err(bad());
    }
    let rest = trim_start_wsp(rest);
    let (transport, rest) = rest.split_at(rest.bytes().take_while(|&b| is_token_byte(b)).count());
    let after = trim_start_wsp(rest);
    if transport.is_empty() || after.len() == rest.len() {
        return Err(bad());
    }
    let (host, rest) = if after.starts_with('[') {
        let close = after.find(']').ok_or_else(bad)?;
        let (host, rest) = after.split_at(close + 1);
        let inner = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        inner.parse::<Ipv6Addr>().map_err(|_| bad())?;
        (host, rest)
    } else {
        let n = after
            .bytes()
            .take_while(|&b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
            .count();
        let (host, rest) = after.split_at(n);
        if !is_hostname(host) {
            return Err(bad());
        }
        (host, rest)
    };
    let rest = trim_start_wsp(rest);
    let (port, params) = match rest.strip_prefix(':') {
        Some(p) => {
            let p = trim_start_wsp(p);
            let (digits, rest) = p.split_at(p.bytes().take_while(u8::is_ascii_digit).count());
            (Some(parse_port(digits)?), rest)
        }
        None => (None, rest),
    };
    Ok(RawVia {
        transport,
        host,
        port,
        params,
    })
}

impl Via {
    pub fn parse(s: &str) -> Result<Via, ParseError> {
        let raw = split_via(s)?;
        let transport = Transport::parse(raw.transport)
            .ok_or_else(|| ParseError::bad("Unknown Via transport"))?;
        let params = parse_params(raw.params)?;
        Ok(Via {
            transport,
            host: raw.host.to_string(),
            port: raw.port,
            params,
        })
    }
    /// A Via with a `branch` parameter; a bare IPv6 `host` gets its brackets.
    pub fn new(transport: Transport, host: &str, port: Option<u16>, branch: &str) -> Via {
        let host = if host.contains(':') && !host.starts_with('[') {
            format!("[{host}]")
        } else {
            host.to_string()
        };
        Via {
            transport,
            host,
            port,
            params: vec![("branch".to_string(), Some(branch.to_string()))],
        }
    }
    pub fn param(&self, name: &str) -> Option<Option<&str>> {
        find_param(&self.params, name)
    }
    pub fn branch(&self) -> Option<&str> {
        self.param("branch").flatten()
    }
    pub fn received(&self) -> Option<&str> {
        self.param("received").flatten()
    }
    /// `Some(None)` for a bare `;rport` (the client asks for it), `Some(Some(p))` once filled in.
    /// A value that is not a port number also reads as `Some(None)`.
    pub fn rport(&self) -> Option<Option<u16>> {
        self.param("rport")
            .map(|v| v.and_then(|p| parse_port(p).ok()))
    }
    pub fn set_param(&mut self, name: &str, value: Option<&str>) {
        set_param(&mut self.params, name, value)
    }
}

impl fmt::Display for Via {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SIP/2.0/{} ", self.transport)?;
        write_host(f, &self.host)?;
        if let Some(port) = self.port {
            write!(f, ":{port}")?;
        }
        write_params(f, &self.params)
    }
}

/// A header line; `name` is the canonical long form (`Via`, `Call-ID`, `CSeq`, `WWW-Authenticate`, ...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub name: String,
    pub value: String,
}

/// Header lines in order. Lookups by name are case-insensitive. After parsing, each Via, Route,
/// Record-Route and Contact value stands in its own `Header`.
///
/// Names given to the methods here may be compact (`v`, `i`, ...); stored names are canonical.
/// A parsed message holds no Content-Length header: the body's length is the truth, and
/// [`serialize`] writes it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers(pub Vec<Header>);

impl Headers {
    pub fn get(&self, name: &str) -> Option<&str> {
        let name = lookup_name(name);
        self.0
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value.as_str())
    }
    pub fn get_all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        let name = lookup_name(name);
        self.0
            .iter()
            .filter(move |h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value.as_str())
    }
    pub fn push(&mut self, name: &str, value: impl Into<String>) {
        self.0.push(Header {
            name: lookup_name(name).to_string(),
            value: value.into(),
        });
    }
    /// Inserts before the first header of that name, or at the top if there is none.
    pub fn push_front(&mut self, name: &str, value: impl Into<String>) {
        let name = lookup_name(name);
        let at = self
            .0
            .iter()
            .position(|h| h.name.eq_ignore_ascii_case(name))
            .unwrap_or(0);
        self.0.insert(
            at,
            Header {
                name: name.to_string(),
                value: value.into(),
            },
        );
    }
    /// Replaces every header of that name with one value (at the place of the first).
    pub fn set(&mut self, name: &str, value: impl Into<String>) {
        let name = lookup_name(name);
        match self
            .0
            .iter()
            .position(|h| h.name.eq_ignore_ascii_case(name))
        {
            Some(at) => {
                if let Some(h) = self.0.get_mut(at) {
                    h.value = value.into();
                }
                let mut i = 0;
                self.0.retain(|h| {
                    let keep = i <= at || !h.name.eq_ignore_ascii_case(name);
                    i += 1;
                    keep
                });
            }
            None => self.0.push(Header {
                name: name.to_string(),
                value: value.into(),
            }),
        }
    }
    /// Removes and returns the first header of that name.
    pub fn remove_first(&mut self, name: &str) -> Option<String> {
        let name = lookup_name(name);
        let at = self
            .0
            .iter()
            .position(|h| h.name.eq_ignore_ascii_case(name))?;
        Some(self.0.remove(at).value)
    }
    pub fn remove_all(&mut self, name: &str) {
        let name = lookup_name(name);
        self.0.retain(|h| !h.name.eq_ignore_ascii_case(name));
    }
    /// All header lines in order.
    pub fn iter(&self) -> std::slice::Iter<'_, Header> {
        self.0.iter()
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub fn contains(&self, name: &str) -> bool {
        self.get(name).is_some()
    }
}

impl<'a> IntoIterator for &'a Headers {
    type Item = &'a Header;
    type IntoIter = std::slice::Iter<'a, Header>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

/// The CSeq header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CSeq {
    pub seq: u32,
    pub method: Method,
}

impl fmt::Display for CSeq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.seq, self.method)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: Method,
    pub uri: Uri,
    pub headers: Headers,
    pub body: Bytes,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub reason: String,
    pub headers: Headers,
    pub body: Bytes,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Request(Request),
    Response(Response),
}

impl Message {
    pub fn headers(&self) -> &Headers {
        match self {
            Message::Request(r) => &r.headers,
            Message::Response(r) => &r.headers,
        }
    }
    pub fn headers_mut(&mut self) -> &mut Headers {
        match self {
            Message::Request(r) => &mut r.headers,
            Message::Response(r) => &mut r.headers,
        }
    }
    pub fn body(&self) -> &Bytes {
        match self {
            Message::Request(r) => &r.body,
            Message::Response(r) => &r.body,
        }
    }
    pub fn is_request(&self) -> bool {
        matches!(self, Message::Request(_))
    }
    pub fn call_id(&self) -> Option<&str> {
        self.headers().get("Call-ID")
    }
    pub fn cseq(&self) -> Result<CSeq, ParseError> {
        cseq(self.headers())
    }
    pub fn top_via(&self) -> Result<Via, ParseError> {
        top_via(self.headers())
    }
}

/// The serialised message, with non-UTF-8 body bytes shown lossily (for logs).
impl fmt::Display for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&String::from_utf8_lossy(&serialize(self)))
    }
}

impl From<Request> for Message {
    fn from(r: Request) -> Self {
        Message::Request(r)
    }
}

impl From<Response> for Message {
    fn from(r: Response) -> Self {
        Message::Response(r)
    }
}

/// Why a message was refused, and how to answer it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status} {reason}")]
pub struct ParseError {
    /// Status to answer a request with: 400, 501 (unknown method), 505 (version), 413 (too large),
    /// 416 (unsupported URI scheme), 513 (message too large). Responses that fail are dropped.
    pub status: u16,
    /// Short human reason, safe to put in a reason phrase (no CR/LF, bounded length).
    pub reason: String,
    /// When the failed input was a request whose Via, From, To, Call-ID and CSeq could still be
    /// read, these headers (in order), so the caller can answer it. `None` otherwise.
    pub answerable: Option<Headers>,
}

impl ParseError {
    /// An error without `answerable`; the reason is cut to 100 bytes, control characters dropped.
    pub fn new(status: u16, reason: &str) -> ParseError {
        let mut r = String::with_capacity(reason.len().min(100));
        for c in reason.chars().filter(|c| !c.is_control()) {
            if r.len() + c.len_utf8() > 100 {
                break;
            }
            r.push(c);
        }
        ParseError {
            status,
            reason: r,
            answerable: None,
        }
    }
    fn bad(reason: &str) -> ParseError {
        ParseError::new(400, reason)
    }
}

/// Via (all), From, To, Call-ID and CSeq of a failed request, when they are all present. The top
/// Via need not parse (RFC 4475 badinv01, badvers): the answer then goes to the packet's source.
fn answerable_headers(headers: &Headers) -> Option<Headers> {
    let mut out = Vec::with_capacity(8);
    out.extend(
        headers
            .0
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("Via"))
            .cloned(),
    );
    out.first()?;
    for name in ["From", "To", "Call-ID", "CSeq"] {
        let h = headers
            .0
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))?;
        out.push(h.clone());
    }
    Some(Headers(out))
}

/// Checks `SIP/2.0`; another well-formed version is 505, anything else 400.
fn check_version(v: &str) -> Result<(), ParseError> {
    if v.eq_ignore_ascii_case("SIP/2.0") {
        return Ok(());
    }
    let well_formed = v.get(..4).is_some_and(|p| p.eq_ignore_ascii_case("SIP/"))
        && v.get(4..)
            .and_then(|n| n.split_once('.'))
            .is_some_and(|(a, b)| {
                !a.is_empty()
                    && !b.is_empty()
                    && a.bytes().chain(b.bytes()).all(|c| c.is_ascii_digit())
            });
    if well_formed {
        Err(ParseError::new(505, "Version Not Supported"))
    } else {
        Err(ParseError::bad("Bad SIP version"))
    }
}

/// `CSeq: 1*DIGIT LWS Method` → number and method token.
fn split_cseq(v: &str) -> Result<(u32, &str), ParseError> {
    let v = trim_wsp(v);
    let (num, method) = v
        .split_once([' ', '\t'])
        .ok_or_else(|| ParseError::bad("Bad CSeq"))?;
    let method = trim_wsp(method);
    if num.is_empty()
        || num.len() > 10
        || !num.bytes().all(|b| b.is_ascii_digit())
        || !is_token(method)
    {
        return Err(ParseError::bad("Bad CSeq"));
    }
    let seq = num
        .parse::<u32>()
        .map_err(|_| ParseError::bad("CSeq number out of range"))?;
    Ok((seq, method))
}

/// Checks one line of the header block: UTF-8 and no stray CR.
fn line_str(line: &[u8]) -> Result<&str, ParseError> {
    let s = std::str::from_utf8(line).map_err(|_| ParseError::bad("Header not UTF-8"))?;
    if s.contains('\r') {
        return Err(ParseError::bad("Stray CR"));
    }
    Ok(s)
}

/// The start line, the raw header block split into headers, and the body slice.
struct Split<'a> {
    start_line: &'a str,
    headers: Headers,
    content_length: Option<u64>,
    body: &'a [u8],
    /// A defect found while splitting that still allows the headers to be read.
    pending: Option<ParseError>,
}

fn split_message<'a>(input: &'a [u8], limits: &Limits) -> Result<Split<'a>, ParseError> {
    let too_large = || ParseError::new(513, "Message Too Large");
    let mut lines = framing::Lines::new(input);
    let first = lines
        .next()
        .ok_or_else(|| ParseError::bad("Empty message"))?;
    if first.len() > limits.max_line {
        return Err(too_large());
    }
    let start_line = line_str(first)?;
    let mut raw: Vec<(&'a str, Cow<'a, str>)> = Vec::with_capacity(24);
    let mut pending = None;
    let mut body_start = None;
    while let Some(line) = lines.next() {
        if line.is_empty() {
            body_start = Some(lines.pos());
            break;
        }
        if line.len() > limits.max_line {
            return Err(too_large());
        }
        let s = line_str(line)?;
        if line.first().is_some_and(|&b| is_wsp(b)) {
            // Folded continuation: the line break and surrounding whitespace become one SP.
            let (name, value) = raw
                .last_mut()
                .ok_or_else(|| ParseError::bad("Continuation line without header"))?;
            let more = trim_wsp(s);
            if !more.is_empty() {
                let v = value.to_mut();
                v.truncate(trim_end_wsp(v).len());
                if !v.is_empty() {
                    v.push(' ');
                }
                v.push_str(more);
            }
            if name.len() + 2 + value.len() > limits.max_line {
                return Err(too_large());
            }
            continue;
        }
        let Some((name, value)) = s.split_once(':') else {
            pending.get_or_insert_with(|| ParseError::bad("Header line without colon"));
            continue;
        };
        // LWS is allowed before the colon (`Via :`).
        let name = trim_end_wsp(name);
        if !is_token(name) {
            pending.get_or_insert_with(|| ParseError::bad("Bad header name"));
            continue;
        }
        if raw.len() >= limits.max_headers {
            return Err(ParseError::new(513, "Too many headers"));
        }
        raw.push((name, Cow::Borrowed(trim_wsp(value))));
    }
    let body = match body_start {
        Some(at) => input.get(at..).unwrap_or_default(),
        None => {
            pending.get_or_insert_with(|| ParseError::bad("Missing empty line after headers"));
            &[]
        }
    };
    let mut headers = Vec::with_capacity(raw.len() + 4);
    let mut content_length: Option<u64> = None;
    for (name, value) in raw {
        let name = lookup_name(name);
        if name == "Content-Length" {
            match framing::parse_content_length(&value) {
                Some(n) if content_length.is_none_or(|c| c == n) => content_length = Some(n),
                Some(_) => {
                    pending.get_or_insert_with(|| ParseError::bad("Conflicting Content-Length"));
                }
                None => {
                    pending.get_or_insert_with(|| ParseError::bad("Bad Content-Length"));
                }
            }
            continue;
        }
        if is_list_header(name) {
            match split_list(&value) {
                Ok(parts) => {
                    if headers.len() + parts.len() > limits.max_headers {
                        return Err(ParseError::new(513, "Too many headers"));
                    }
                    headers.extend(parts.into_iter().map(|p| Header {
                        name: name.to_string(),
                        value: p.to_string(),
                    }));
                    continue;
                }
                Err(e) => {
                    pending.get_or_insert(e);
                }
            }
        }
        if headers.len() >= limits.max_headers {
            return Err(ParseError::new(513, "Too many headers"));
        }
        headers.push(Header {
            name: name.to_string(),
            value: value.into_owned(),
        });
    }
    Ok(Split {
        start_line,
        headers: Headers(headers),
        content_length,
        body,
        pending,
    })
}

/// Core headers read and checked for both requests and responses.
struct CoreHeaders<'a> {
    seq: u32,
    cseq_method: &'a str,
    from: Option<UriRef<'a>>,
    to: Option<UriRef<'a>>,
}

/// Presence, uniqueness and syntax of the headers every message needs (RFC 3261 §8.1.1), plus
/// the syntax of every Via and Contact value.
fn check_core(headers: &Headers) -> Result<CoreHeaders<'_>, ParseError> {
    let (mut via, mut from, mut to, mut call_id, mut cseq) = (None, None, None, None, None);
    let mut dup = false;
    let mut seen_other = [false; 2]; // Max-Forwards, Content-Type
    for h in &headers.0 {
        let v = h.value.as_str();
        let slot = match h.name.as_str() {
            "Via" => {
                walk_params(split_via(v)?.params, |_, _| {})?;
                via.get_or_insert(v);
                continue;
            }
            "Contact" => {
                if trim_wsp(v) != "*" {
                    check_name_addr(v)?;
                }
                continue;
            }
            "Max-Forwards" => {
                if v.is_empty() || v.len() > 10 || !v.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(ParseError::bad("Bad Max-Forwards"));
                }
                dup |= std::mem::replace(&mut seen_other[0], true);
                continue;
            }
            "Content-Type" => {
                dup |= std::mem::replace(&mut seen_other[1], true);
                continue;
            }
            "From" => &mut from,
            "To" => &mut to,
            "Call-ID" => &mut call_id,
            "CSeq" => &mut cseq,
            _ => continue,
        };
        dup |= slot.is_some();
        slot.get_or_insert(v);
    }
    let (Some(top_via), Some(from), Some(to), Some(call_id), Some(cseq)) =
        (via, from, to, call_id, cseq)
    else {
        return Err(ParseError::bad("Missing required header"));
    };
    if dup {
        return Err(ParseError::bad("Repeated single-value header"));
    }
    // The top Via must be one we can answer to.
    Transport::parse(split_via(top_via)?.transport)
        .ok_or_else(|| ParseError::bad("Unknown Via transport"))?;
    let from = check_name_addr(from)?;
    let to = check_name_addr(to)?;
    if !is_call_id(call_id) {
        return Err(ParseError::bad("Bad Call-ID"));
    }
    let (seq, cseq_method) = split_cseq(cseq)?;
    Ok(CoreHeaders {
        seq,
        cseq_method,
        from,
        to,
    })
}

/// Parses one whole message (a UDP datagram, or a frame cut by [`frame_stream`]).
///
/// Leading CRLFs are skipped. Bare LF line ends are accepted. A body longer than Content-Length
/// is cut to it (the rest of a datagram is ignored); a missing Content-Length means the rest of
/// the input is the body. The parsed headers hold no Content-Length (see [`Headers`]).
pub fn parse(input: &[u8], limits: &Limits) -> Result<Message, ParseError> {
    if input.len() > limits.max_message {
        return Err(ParseError::new(513, "Message Too Large"));
    }
    let skip = input
        .iter()
        .take_while(|&&b| b == b'\r' || b == b'\n')
        .count();
    let input = input.get(skip..).unwrap_or_default();
    let split = split_message(input, limits)?;
    let is_response = split
        .start_line
        .get(..4)
        .is_some_and(|p| p.eq_ignore_ascii_case("SIP/"));
    if is_response {
        parse_response(split)
    } else {
        match check_request(&split) {
            Ok((method, uri, body)) => Ok(Message::Request(Request {
                method,
                uri,
                headers: split.headers,
                body,
            })),
            Err(mut e) => {
                e.answerable = answerable_headers(&split.headers);
                Err(e)
            }
        }
    }
}

/// The body cut to Content-Length; a shorter body is an error.
fn body_of(split: &Split<'_>) -> Result<Bytes, ParseError> {
    let body = match split.content_length {
        Some(cl) => usize::try_from(cl)
            .ok()
            .and_then(|cl| split.body.get(..cl))
            .ok_or_else(|| ParseError::bad("Body shorter than Content-Length"))?,
        None => split.body,
    };
    Ok(Bytes::copy_from_slice(body))
}

fn check_request(split: &Split<'_>) -> Result<(Method, Uri, Bytes), ParseError> {
    if let Some(e) = &split.pending {
        return Err(e.clone());
    }
    let mut parts = split.start_line.split(' ');
    let (Some(m), Some(u), Some(v), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(ParseError::bad("Bad request line"));
    };
    if !is_token(m) || u.is_empty() {
        return Err(ParseError::bad("Bad request line"));
    }
    check_version(v)?;
    if u.starts_with('<') {
        return Err(ParseError::bad("Bad Request-URI"));
    }
    let uri = UriRef::parse(u)?;
    if uri.headers.is_some() {
        return Err(ParseError::bad("Headers in Request-URI"));
    }
    let core = check_core(&split.headers)?;
    if core.cseq_method != m {
        return Err(ParseError::bad("CSeq method does not match"));
    }
    let Some(method) = Method::from_token(m) else {
        return Err(ParseError::new(501, "Not Implemented"));
    };
    let body = body_of(split)?;
    rsip_check::check_request(
        method,
        &uri,
        &rsip_check::Core {
            seq: core.seq,
            cseq_method: method,
            from: core.from.as_ref(),
            to: core.to.as_ref(),
        },
    )?;
    Ok((method, uri.to_uri(), body))
}

fn parse_response(split: Split<'_>) -> Result<Message, ParseError> {
    if let Some(e) = split.pending {
        return Err(e);
    }
    let (version, rest) = split
        .start_line
        .split_once(' ')
        .ok_or_else(|| ParseError::bad("Bad status line"))?;
    check_version(version)?;
    let (code, reason) = rest.split_once(' ').unwrap_or((rest, ""));
    let status = match code.as_bytes() {
        [a @ b'1'..=b'6', b, c] if b.is_ascii_digit() && c.is_ascii_digit() => {
            u16::from(a - b'0') * 100 + u16::from(b - b'0') * 10 + u16::from(c - b'0')
        }
        _ => return Err(ParseError::bad("Bad status code")),
    };
    if reason.chars().any(|c| c.is_control() && c != '\t') {
        return Err(ParseError::bad("Bad reason phrase"));
    }
    let core = check_core(&split.headers)?;
    // We only send the methods we know, so a response for another one matches nothing.
    let cseq_method = Method::from_token(core.cseq_method)
        .ok_or_else(|| ParseError::bad("Unknown CSeq method"))?;
    let body = body_of(&split)?;
    rsip_check::check_response(&rsip_check::Core {
        seq: core.seq,
        cseq_method,
        from: core.from.as_ref(),
        to: core.to.as_ref(),
    })?;
    let reason = reason.to_string();
    Ok(Message::Response(Response {
        status,
        reason,
        headers: split.headers,
        body,
    }))
}

/// Appends `s` with any CR or LF replaced by a space, so no value can inject a line.
fn push_line_safe(out: &mut Vec<u8>, s: &str) {
    if s.bytes().any(|b| b == b'\r' || b == b'\n') {
        out.extend(
            s.bytes()
                .map(|b| if b == b'\r' || b == b'\n' { b' ' } else { b }),
        );
    } else {
        out.extend_from_slice(s.as_bytes());
    }
}

/// Serialises: start line, headers in order, a recomputed Content-Length, blank line, raw body.
pub fn serialize(msg: &Message) -> Vec<u8> {
    let (headers, body) = match msg {
        Message::Request(r) => (&r.headers, &r.body),
        Message::Response(r) => (&r.headers, &r.body),
    };
    let estimate = 64
        + body.len()
        + headers
            .0
            .iter()
            .map(|h| h.name.len() + h.value.len() + 4)
            .sum::<usize>();
    let mut out = Vec::with_capacity(estimate);
    match msg {
        Message::Request(r) => {
            out.extend_from_slice(r.method.as_str().as_bytes());
            out.push(b' ');
            push_line_safe(&mut out, &r.uri.to_string());
            out.extend_from_slice(b" SIP/2.0\r\n");
        }
        Message::Response(r) => {
            out.extend_from_slice(b"SIP/2.0 ");
            out.extend_from_slice(r.status.to_string().as_bytes());
            out.push(b' ');
            push_line_safe(&mut out, &r.reason);
            out.extend_from_slice(b"\r\n");
        }
    }
    for h in &headers.0 {
        if lookup_name(&h.name) == "Content-Length" {
            continue;
        }
        push_line_safe(&mut out, &h.name);
        out.extend_from_slice(b": ");
        push_line_safe(&mut out, &h.value);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"Content-Length: ");
    out.extend_from_slice(body.len().to_string().as_bytes());
    out.extend_from_slice(b"\r\n\r\n");
    out.extend_from_slice(body);
    out
}

/// Outcome of looking at the front of a stream buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Not enough bytes yet.
    Incomplete,
    /// Leading CRLFs (keepalive) of this length: consume them. `ping` is true for a double CRLF
    /// ("\r\n\r\n"), which RFC 5626 says to answer with a single CRLF ("pong").
    Keepalive { len: usize, ping: bool },
    /// A whole message of this many bytes sits at the front.
    Message(usize),
    /// The stream cannot be framed (no Content-Length on a stream, a bad one, or over the cap):
    /// the connection must be closed.
    Invalid(ParseError),
}

/// Finds the first message in a stream buffer (TCP): headers end at CRLFCRLF, the body length is
/// Content-Length (or `l:`), which is mandatory on streams; `max` caps the whole message.
///
/// A lone "\r\n" at the front is a `Keepalive { len: 2, ping: false }`; "\r\n\r" waits for more
/// (it may become a ping); a bare "\n" is tolerated as a keepalive of length 1.
pub fn frame_stream(buf: &[u8], max: usize) -> Frame {
    framing::frame(buf, max)
}

/// The reason phrase RFC 3261 and friends give a status code ("Unknown" for codes none defines).
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        100 => "Trying",
        180 => "Ringing",
        181 => "Call Is Being Forwarded",
        182 => "Queued",
        183 => "Session Progress",
        199 => "Early Dialog Terminated",
        200 => "OK",
        202 => "Accepted",
        204 => "No Notification",
        300 => "Multiple Choices",
        301 => "Moved Permanently",
        302 => "Moved Temporarily",
        305 => "Use Proxy",
        380 => "Alternative Service",
        400 => "Bad Request",
        401 => "Unauthorized",
        402 => "Payment Required",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        406 => "Not Acceptable",
        407 => "Proxy Authentication Required",
        408 => "Request Timeout",
        410 => "Gone",
        412 => "Conditional Request Failed",
        413 => "Request Entity Too Large",
        414 => "Request-URI Too Long",
        415 => "Unsupported Media Type",
        416 => "Unsupported URI Scheme",
        417 => "Unknown Resource-Priority",
        420 => "Bad Extension",
        421 => "Extension Required",
        422 => "Session Interval Too Small",
        423 => "Interval Too Brief",
        428 => "Use Identity Header",
        429 => "Provide Referrer Identity",
        433 => "Anonymity Disallowed",
        436 => "Bad Identity-Info",
        437 => "Unsupported Certificate",
        438 => "Invalid Identity Header",
        439 => "First Hop Lacks Outbound Support",
        469 => "Bad Info Package",
        470 => "Consent Needed",
        480 => "Temporarily Unavailable",
        481 => "Call/Transaction Does Not Exist",
        482 => "Loop Detected",
        483 => "Too Many Hops",
        484 => "Address Incomplete",
        485 => "Ambiguous",
        486 => "Busy Here",
        487 => "Request Terminated",
        488 => "Not Acceptable Here",
        489 => "Bad Event",
        491 => "Request Pending",
        493 => "Undecipherable",
        494 => "Security Agreement Required",
        500 => "Server Internal Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Server Time-out",
        505 => "Version Not Supported",
        513 => "Message Too Large",
        580 => "Precondition Failure",
        600 => "Busy Everywhere",
        603 => "Decline",
        604 => "Does Not Exist Anywhere",
        606 => "Not Acceptable",
        607 => "Unwanted",
        608 => "Rejected",
        _ => "Unknown",
    }
}

/// The header accessors requests and responses share; each parses its header on call.
macro_rules! header_accessors {
    ($($t:ty),*) => {$(
        impl $t {
            pub fn top_via(&self) -> Result<Via, ParseError> {
                top_via(&self.headers)
            }
            pub fn cseq(&self) -> Result<CSeq, ParseError> {
                cseq(&self.headers)
            }
            pub fn call_id(&self) -> Option<&str> {
                self.headers.get("Call-ID")
            }
            pub fn from(&self) -> Result<NameAddr, ParseError> {
                name_addr_header(&self.headers, "From")
            }
            pub fn to(&self) -> Result<NameAddr, ParseError> {
                name_addr_header(&self.headers, "To")
            }
        }
    )*};
}

header_accessors!(Request, Response);

impl Request {
    /// A request with no headers and an empty body.
    pub fn new(method: Method, uri: Uri) -> Request {
        Request {
            method,
            uri,
            headers: Headers::default(),
            body: Bytes::new(),
        }
    }
}

impl Response {
    /// A response with the standard reason phrase, no headers and an empty body.
    pub fn new(status: u16) -> Response {
        Response {
            status,
            reason: reason_phrase(status).to_string(),
            headers: Headers::default(),
            body: Bytes::new(),
        }
    }
}

pub fn top_via(headers: &Headers) -> Result<Via, ParseError> {
    Via::parse(
        headers
            .get("Via")
            .ok_or_else(|| ParseError::bad("Missing Via"))?,
    )
}

pub fn cseq(headers: &Headers) -> Result<CSeq, ParseError> {
    let (seq, method) = split_cseq(
        headers
            .get("CSeq")
            .ok_or_else(|| ParseError::bad("Missing CSeq"))?,
    )?;
    let method =
        Method::from_token(method).ok_or_else(|| ParseError::new(501, "Not Implemented"))?;
    Ok(CSeq { seq, method })
}

pub fn name_addr_header(headers: &Headers, name: &str) -> Result<NameAddr, ParseError> {
    NameAddr::parse(
        headers
            .get(name)
            .ok_or_else(|| ParseError::bad("Missing header"))?,
    )
}

/// Every Contact of a message, in order (`*` included).
pub fn contacts(headers: &Headers) -> Result<Vec<Contact>, ParseError> {
    let mut out = Vec::new();
    for value in headers.get_all("Contact") {
        // Headers built by hand may still hold comma lists.
        for part in split_list(value)? {
            out.push(Contact::parse(part)?);
        }
    }
    Ok(out)
}

/// Copies Via (all, in order), From, To, Call-ID, CSeq, and for 100 Trying also Timestamp.
fn response_headers(headers: &Headers, status: u16) -> Headers {
    let mut out = Vec::with_capacity(8);
    out.extend(
        headers
            .0
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("Via"))
            .cloned(),
    );
    let mut names = vec!["From", "To", "Call-ID", "CSeq"];
    if status == 100 {
        names.push("Timestamp");
    }
    for name in names {
        if let Some(h) = headers.0.iter().find(|h| h.name.eq_ignore_ascii_case(name)) {
            out.push(h.clone());
        }
    }
    Headers(out)
}

/// Appends `;tag=` to the To header unless it already has a tag.
fn add_to_tag(headers: &mut Headers, tag: &str) {
    if let Some(h) = headers
        .0
        .iter_mut()
        .find(|h| h.name.eq_ignore_ascii_case("To"))
    {
        let has_tag = match NameAddr::parse(&h.value) {
            Ok(na) => na.tag().is_some(),
            Err(_) => split_name_addr(&h.value).is_ok_and(|raw| {
                let mut found = false;
                let _ = walk_params(raw.params, |n, _| found |= n.eq_ignore_ascii_case("tag"));
                found
            }),
        };
        if !has_tag {
            h.value.push_str(";tag=");
            h.value.push_str(tag);
        }
    }
}

/// The CANCEL of an INVITE as it was sent (RFC 3261 §9.1): the same Request-URI, top Via
/// (so the same branch), Route set, From, To and Call-ID, and the INVITE's CSeq number.
pub fn make_cancel(invite: &Request) -> Request {
    let mut headers = Headers::default();
    if let Some(v) = invite.headers.get("Via") {
        headers.push("Via", v);
    }
    for name in ["Route", "From", "To", "Call-ID"] {
        for v in invite.headers.get_all(name) {
            headers.push(name, v);
        }
    }
    let seq = invite.cseq().map(|c| c.seq).unwrap_or(1);
    headers.push("CSeq", format!("{seq} CANCEL"));
    headers.push("Max-Forwards", "70");
    Request {
        method: Method::Cancel,
        uri: invite.uri.clone(),
        headers,
        body: Bytes::new(),
    }
}

/// A response to `req` (RFC 3261 §8.2.6): Via list, From, To, Call-ID and CSeq copied; a To tag
/// added when `to_tag` is given and the To has none; reason from [`reason_phrase`] unless given.
pub fn make_response(
    req: &Request,
    status: u16,
    reason: Option<&str>,
    to_tag: Option<&str>,
) -> Response {
    let mut headers = response_headers(&req.headers, status);
    if let Some(tag) = to_tag {
        add_to_tag(&mut headers, tag);
    }
    Response {
        status,
        reason: reason.unwrap_or(reason_phrase(status)).to_string(),
        headers,
        body: Bytes::new(),
    }
}

/// Same as [`make_response`] but from the headers of a request that failed to parse
/// ([`ParseError::answerable`]).
///
/// Except for 100, a To without a tag gets one (RFC 3261 §8.2.6.2), derived from the Call-ID,
/// From and top Via so that a retransmitted request gets the same tag.
pub fn make_response_from_headers(headers: &Headers, status: u16, reason: &str) -> Response {
    let mut out = response_headers(headers, status);
    if status != 100 {
        // FNV-1a 64 over the identifying headers.
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for name in ["Call-ID", "From", "Via"] {
            for b in headers.get(name).unwrap_or("").bytes().chain([0]) {
                hash = (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
            }
        }
        add_to_tag(&mut out, &format!("{hash:016x}"));
    }
    Response {
        status,
        reason: reason.to_string(),
        headers: out,
        body: Bytes::new(),
    }
}

/// Whether a `Content-Type` value names the media type `wanted` (parameters ignored, case
/// insensitive).
pub fn is_media_type(content_type: Option<&str>, wanted: &str) -> bool {
    content_type.is_some_and(|c| {
        c.split(';')
            .next()
            .unwrap_or("")
            .trim()
            .eq_ignore_ascii_case(wanted)
    })
}

/// A new RFC 3261 branch: `z9hG4bK` and at least 64 random bits.
pub fn new_branch() -> String {
    format!(
        "z9hG4bK{:016x}{:08x}",
        rand::random::<u64>(),
        rand::random::<u32>()
    )
}

/// A new From/To tag (at least 64 random bits).
pub fn new_tag() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// A new Call-ID.
pub fn new_call_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}
