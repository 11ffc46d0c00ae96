//! Small lexical helpers for RFC 3261 §25: tokens, quoted strings, parameter lists, comma lists,
//! header names. Everything here works on `&str` slices and never panics: slice bounds always
//! come from `find`/`split_once` or from counting ASCII bytes.

use super::ParseError;

const TOKEN_BYTES: [bool; 256] = {
    let mut table = [false; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        table[i] = b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'-' | b'.' | b'!' | b'%' | b'*' | b'_' | b'+' | b'`' | b'\'' | b'~'
            );
        i += 1;
    }
    table
};

/// `token` characters (RFC 3261 §25.1).
pub(super) fn is_token_byte(b: u8) -> bool {
    TOKEN_BYTES[usize::from(b)]
}

pub(super) fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(is_token_byte)
}

pub(super) fn is_wsp(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

pub(super) fn trim_wsp(s: &str) -> &str {
    s.trim_matches([' ', '\t'])
}

pub(super) fn trim_start_wsp(s: &str) -> &str {
    s.trim_start_matches([' ', '\t'])
}

pub(super) fn trim_end_wsp(s: &str) -> &str {
    s.trim_end_matches([' ', '\t'])
}

/// `unreserved` = alphanum / mark.
pub(super) fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'-' | b'_' | b'.' | b'!' | b'~' | b'*' | b'\'' | b'(' | b')'
        )
}

/// True when every byte is `allowed` or part of a `%HH` escape.
pub(super) fn valid_escaped(s: &str, allowed: impl Fn(u8) -> bool) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        if c == b'%' {
            match (b.get(i + 1), b.get(i + 2)) {
                (Some(h), Some(l)) if h.is_ascii_hexdigit() && l.is_ascii_hexdigit() => i += 3,
                _ => return false,
            }
        } else if allowed(c) {
            i += 1;
        } else {
            return false;
        }
    }
    true
}

/// URI scheme syntax: ALPHA *( ALPHA / DIGIT / "+" / "-" / "." ).
pub(super) fn is_scheme(s: &str) -> bool {
    let mut bytes = s.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic())
        && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'))
}

/// Host name or IPv4 literal (IPv6 references are handled by the callers).
pub(super) fn is_hostname(s: &str) -> bool {
    let b = s.as_bytes();
    if !b.first().is_some_and(|c| c.is_ascii_alphanumeric()) {
        return false;
    }
    let mut prev = 0u8;
    for &c in b {
        if !(c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_')) {
            return false;
        }
        // No empty label, and no label ending with '-'.
        if c == b'.' && (prev == b'.' || prev == b'-') {
            return false;
        }
        if c == b'-' && prev == b'.' {
            return false;
        }
        prev = c;
    }
    prev != b'-'
}

/// Returns the index just past the closing quote of the quoted string starting at `start`
/// (which must hold `"`). Validates `qdtext` / `quoted-pair`.
pub(super) fn quoted_end(b: &[u8], start: usize) -> Result<usize, ParseError> {
    let mut j = start + 1;
    loop {
        match b.get(j) {
            None => return Err(ParseError::bad("Unterminated quoted string")),
            Some(b'\\') => match b.get(j + 1) {
                Some(&c) if c <= 0x7f && c != b'\r' && c != b'\n' => j += 2,
                _ => return Err(ParseError::bad("Bad quoted pair")),
            },
            Some(b'"') => return Ok(j + 1),
            Some(&c) if (c < 0x20 && c != b'\t') || c == 0x7f => {
                return Err(ParseError::bad("Control character in quoted string"));
            }
            Some(_) => j += 1,
        }
    }
}

fn skip_wsp(b: &[u8], mut i: usize) -> usize {
    while b.get(i).is_some_and(|&c| is_wsp(c)) {
        i += 1;
    }
    i
}

/// Walks `*( SEMI generic-param )` with LWS allowed around `;` and `=`
/// (gen-value = token / host / quoted-string; quoted values are passed with their quotes).
pub(super) fn walk_params<'a>(
    s: &'a str,
    mut f: impl FnMut(&'a str, Option<&'a str>),
) -> Result<(), ParseError> {
    let b = s.as_bytes();
    let mut i = 0;
    loop {
        i = skip_wsp(b, i);
        if i >= b.len() {
            return Ok(());
        }
        if b.get(i) != Some(&b';') {
            return Err(ParseError::bad("Bad parameter list"));
        }
        i = skip_wsp(b, i + 1);
        let start = i;
        while b.get(i).is_some_and(|&c| is_token_byte(c)) {
            i += 1;
        }
        let name = s.get(start..i).unwrap_or("");
        if name.is_empty() {
            return Err(ParseError::bad("Empty parameter"));
        }
        let after_name = skip_wsp(b, i);
        let value = if b.get(after_name) == Some(&b'=') {
            i = skip_wsp(b, after_name + 1);
            let vstart = i;
            if b.get(i) == Some(&b'"') {
                i = quoted_end(b, i)?;
            } else {
                while b
                    .get(i)
                    .is_some_and(|&c| is_token_byte(c) || matches!(c, b':' | b'[' | b']'))
                {
                    i += 1;
                }
            }
            let v = s.get(vstart..i).unwrap_or("");
            if v.is_empty() {
                return Err(ParseError::bad("Empty parameter value"));
            }
            Some(v)
        } else {
            i = after_name;
            None
        };
        f(name, value);
    }
}

pub(super) type Params = Vec<(String, Option<String>)>;

pub(super) fn parse_params(s: &str) -> Result<Params, ParseError> {
    let mut out = Vec::new();
    walk_params(s, |n, v| out.push((n.to_string(), v.map(str::to_string))))?;
    Ok(out)
}

pub(super) fn find_param<'a>(params: &'a Params, name: &str) -> Option<Option<&'a str>> {
    params
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_deref())
}

pub(super) fn set_param(params: &mut Params, name: &str, value: Option<&str>) {
    let value = value.map(str::to_string);
    match params
        .iter_mut()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
    {
        Some(slot) => slot.1 = value,
        None => params.push((name.to_string(), value)),
    }
}

/// Splits a comma-separated header value; commas inside quoted strings and inside `<...>` are
/// not separators. Empty elements are an error.
pub(super) fn split_list(value: &str) -> Result<Vec<&str>, ParseError> {
    let b = value.as_bytes();
    let mut parts = Vec::new();
    let mut start = 0;
    let mut in_quote = false;
    let mut in_angle = false;
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        if in_quote {
            match c {
                b'\\' => i += 1,
                b'"' => in_quote = false,
                _ => {}
            }
        } else {
            match c {
                b'"' => in_quote = true,
                b'<' => in_angle = true,
                b'>' => in_angle = false,
                b',' if !in_angle => {
                    parts.push(trim_wsp(value.get(start..i).unwrap_or("")));
                    start = i + 1;
                }
                _ => {}
            }
        }
        i += 1;
    }
    if in_quote {
        return Err(ParseError::bad("Unterminated quoted string"));
    }
    parts.push(trim_wsp(value.get(start..).unwrap_or("")));
    if parts.iter().any(|p| p.is_empty()) {
        return Err(ParseError::bad("Empty element in header list"));
    }
    Ok(parts)
}

/// Headers whose comma lists are split into one `Header` each.
pub(super) fn is_list_header(canonical: &str) -> bool {
    matches!(canonical, "Via" | "Route" | "Record-Route" | "Contact")
}

/// Long name for a compact form (RFC 3261 §7.3.3 and later RFCs).
pub(super) fn compact(c: u8) -> Option<&'static str> {
    Some(match c.to_ascii_lowercase() {
        b'v' => "Via",
        b'i' => "Call-ID",
        b'f' => "From",
        b't' => "To",
        b'm' => "Contact",
        b'c' => "Content-Type",
        b'l' => "Content-Length",
        b'k' => "Supported",
        b's' => "Subject",
        b'e' => "Content-Encoding",
        b'o' => "Event",
        b'r' => "Refer-To",
        b'u' => "Allow-Events",
        b'x' => "Session-Expires",
        b'a' => "Accept-Contact",
        b'b' => "Referred-By",
        b'd' => "Request-Disposition",
        b'j' => "Reject-Contact",
        b'y' => "Identity",
        _ => return None,
    })
}

/// Canonical spelling of a known header name (compact forms expanded), `None` if unknown.
pub(super) fn known_name(name: &str) -> Option<&'static str> {
    if let [c] = name.as_bytes() {
        return compact(*c);
    }
    let mut buf = [0u8; 32];
    let lower = buf.get_mut(..name.len())?;
    for (d, s) in lower.iter_mut().zip(name.bytes()) {
        *d = s.to_ascii_lowercase();
    }
    let lower = std::str::from_utf8(lower).ok()?;
    Some(match lower {
        "via" => "Via",
        "call-id" => "Call-ID",
        "from" => "From",
        "to" => "To",
        "cseq" => "CSeq",
        "contact" => "Contact",
        "max-forwards" => "Max-Forwards",
        "content-length" => "Content-Length",
        "content-type" => "Content-Type",
        "route" => "Route",
        "record-route" => "Record-Route",
        "expires" => "Expires",
        "user-agent" => "User-Agent",
        "server" => "Server",
        "allow" => "Allow",
        "supported" => "Supported",
        "require" => "Require",
        "proxy-require" => "Proxy-Require",
        "unsupported" => "Unsupported",
        "authorization" => "Authorization",
        "proxy-authorization" => "Proxy-Authorization",
        "www-authenticate" => "WWW-Authenticate",
        "proxy-authenticate" => "Proxy-Authenticate",
        "authentication-info" => "Authentication-Info",
        "accept" => "Accept",
        "accept-encoding" => "Accept-Encoding",
        "accept-language" => "Accept-Language",
        "accept-contact" => "Accept-Contact",
        "accept-resource-priority" => "Accept-Resource-Priority",
        "alert-info" => "Alert-Info",
        "allow-events" => "Allow-Events",
        "answer-mode" => "Answer-Mode",
        "call-info" => "Call-Info",
        "content-disposition" => "Content-Disposition",
        "content-encoding" => "Content-Encoding",
        "content-id" => "Content-ID",
        "content-language" => "Content-Language",
        "date" => "Date",
        "error-info" => "Error-Info",
        "event" => "Event",
        "flow-timer" => "Flow-Timer",
        "history-info" => "History-Info",
        "identity" => "Identity",
        "identity-info" => "Identity-Info",
        "in-reply-to" => "In-Reply-To",
        "join" => "Join",
        "max-breadth" => "Max-Breadth",
        "mime-version" => "MIME-Version",
        "min-expires" => "Min-Expires",
        "min-se" => "Min-SE",
        "organization" => "Organization",
        "p-asserted-identity" => "P-Asserted-Identity",
        "p-preferred-identity" => "P-Preferred-Identity",
        "p-access-network-info" => "P-Access-Network-Info",
        "p-called-party-id" => "P-Called-Party-ID",
        "p-charging-vector" => "P-Charging-Vector",
        "p-associated-uri" => "P-Associated-URI",
        "p-visited-network-id" => "P-Visited-Network-ID",
        "path" => "Path",
        "priority" => "Priority",
        "privacy" => "Privacy",
        "rack" => "RAck",
        "reason" => "Reason",
        "refer-sub" => "Refer-Sub",
        "refer-to" => "Refer-To",
        "referred-by" => "Referred-By",
        "reject-contact" => "Reject-Contact",
        "replaces" => "Replaces",
        "reply-to" => "Reply-To",
        "request-disposition" => "Request-Disposition",
        "resource-priority" => "Resource-Priority",
        "retry-after" => "Retry-After",
        "rseq" => "RSeq",
        "security-client" => "Security-Client",
        "security-server" => "Security-Server",
        "security-verify" => "Security-Verify",
        "service-route" => "Service-Route",
        "session-expires" => "Session-Expires",
        "sip-etag" => "SIP-ETag",
        "sip-if-match" => "SIP-If-Match",
        "subject" => "Subject",
        "subscription-state" => "Subscription-State",
        "target-dialog" => "Target-Dialog",
        "timestamp" => "Timestamp",
        "unsupported-uri" => "Unsupported-URI",
        "warning" => "Warning",
        _ => return None,
    })
}

/// The name to store: canonical when known, else as written.
pub(super) fn lookup_name(name: &str) -> &str {
    known_name(name).unwrap_or(name)
}

/// Call-ID = word [ "@" word ] (RFC 3261 §25.1 `word` characters).
pub(super) fn is_call_id(s: &str) -> bool {
    !s.is_empty()
        && s.bytes().all(|b| {
            is_token_byte(b)
                || matches!(
                    b,
                    b'(' | b')'
                        | b'<'
                        | b'>'
                        | b':'
                        | b'\\'
                        | b'"'
                        | b'/'
                        | b'['
                        | b']'
                        | b'?'
                        | b'{'
                        | b'}'
                        | b'@'
                )
        })
}
