//! Service sessions as the `open` command sees them, without I/O: the request body, how a 2xx
//! gives access to the service, the words for a failed attempt, the charge of a closed session,
//! and the commands read on standard input.

use crate::output::Charge;
use anyhow::Context as _;
use bytes::Bytes;
use proto::service::{
    CHARGE_HEADER, ChargeSummary, SERVICE_ACCESS_TYPE, ServiceAccess, ServiceRequest,
};
use proto::sip::message::{Headers, Response};
use std::path::Path;

/// How to reach a service session, from the application server's 2xx.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Access {
    pub url: Option<String>,
    pub service: String,
    pub server: Option<String>,
    pub session_id: Option<String>,
}

/// The access a 2xx gives: a [`SERVICE_ACCESS_TYPE`] body, else a `Call-Info: <URL>;purpose=info`
/// header (then the service is the one asked for, and server and session id are unknown).
pub fn access_from(resp: &Response, requested: &str) -> Access {
    let from_body = (content_type(&resp.headers).as_deref() == Some(SERVICE_ACCESS_TYPE))
        .then(|| ServiceAccess::parse(&resp.body))
        .flatten();
    let non_empty = |s: String| (!s.trim().is_empty()).then_some(s);
    match from_body {
        Some(a) => Access {
            url: non_empty(a.url).or_else(|| call_info_url(&resp.headers)),
            service: non_empty(a.service).unwrap_or_else(|| requested.to_string()),
            server: non_empty(a.server),
            session_id: non_empty(a.session_id),
        },
        None => Access {
            url: call_info_url(&resp.headers),
            service: requested.to_string(),
            server: None,
            session_id: None,
        },
    }
}

/// The media type of a message's body, lower case, without parameters.
fn content_type(headers: &Headers) -> Option<String> {
    headers.get("Content-Type").map(|c| {
        c.split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase()
    })
}

/// The URL of the first `Call-Info` entry with `purpose=info` (RFC 3261 §20.9); a header may hold
/// a comma list, and the URL is between angle brackets.
pub fn call_info_url(headers: &Headers) -> Option<String> {
    headers
        .get_all("Call-Info")
        .flat_map(split_outside_brackets)
        .find_map(|entry| {
            let entry = entry.trim();
            let rest = entry.strip_prefix('<')?;
            let (url, params) = rest.split_once('>')?;
            let is_info = params.split(';').any(|p| {
                let (name, value) = p.split_once('=').unwrap_or((p, ""));
                name.trim().eq_ignore_ascii_case("purpose")
                    && value.trim().trim_matches('"').eq_ignore_ascii_case("info")
            });
            let url = url.trim();
            (is_info && !url.is_empty()).then(|| url.to_string())
        })
}

/// Splits a header value at the commas that are outside `<…>` and quoted strings.
fn split_outside_brackets(value: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut angle, mut quoted, mut escaped) = (false, false, false);
    let mut start = 0;
    for (i, c) in value.char_indices() {
        if quoted {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => quoted = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' if !angle => quoted = true,
            '<' => angle = true,
            '>' => angle = false,
            ',' if !angle => {
                parts.push(&value[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&value[start..]);
    parts
}

/// The `Retry-After` of a response in seconds (the number before any comment or parameter).
pub fn retry_after(headers: &Headers) -> Option<u64> {
    let v = headers.get("Retry-After")?.trim_start();
    let digits = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    v[..digits].parse().ok()
}

/// `(404 Not Found)`, or `(404)` without a reason phrase.
pub fn status_note(status: u16, reason: &str) -> String {
    let reason = reason.trim();
    if reason.is_empty() {
        format!("({status})")
    } else {
        format!("({status} {reason})")
    }
}

/// What a failed `open` means, in words, with the status and reason phrase of the response.
/// `challenged`: credentials had been sent when the answer came.
pub fn failure_message(
    service: &str,
    status: u16,
    reason: &str,
    retry_after: Option<u64>,
    challenged: bool,
) -> String {
    let note = status_note(status, reason);
    let reason = reason.trim();
    match status {
        401 | 407 if challenged => format!("wrong user name or password {note}"),
        401 | 407 => {
            format!("the relay asked for credentials in a way this agent cannot answer {note}")
        }
        400 => format!("the relay rejected the request: {reason} ({status})"),
        403 => format!("refused: {reason} {note}"),
        404 => format!("no such service: {service} {note}"),
        408 => format!("no server answered in time {note}"),
        480 => format!("nobody is serving {service} right now {note}"),
        503 if reason == proto::service::STOPPING_REASON => match retry_after {
            Some(secs) => format!("the relay is stopping; try again in {secs} s {note}"),
            None => format!("the relay is stopping {note}"),
        },
        486 | 600 | 503 => match retry_after {
            Some(secs) => format!("the server is busy; try again in {secs} s {note}"),
            None => format!("the server is busy {note}"),
        },
        487 => format!("cancelled {note}"),
        _ => format!("refused {note}"),
    }
}

/// What to say when the INVITE got no final answer at all.
pub const NO_ANSWER: &str = "no answer from the relay";

/// The charge in a `Relay-Charge` header, if the relay put one.
pub fn charge_of(headers: &Headers) -> Option<ChargeSummary> {
    headers.get(CHARGE_HEADER).and_then(ChargeSummary::parse)
}

/// The items of the relay's bill (`Relay-Bill`), none when it sent none.
pub fn items_of(headers: &Headers) -> Vec<proto::charge::BillLine> {
    headers
        .get(proto::charge::BILL_HEADER)
        .and_then(proto::charge::Bill::from_header)
        .map(|b| b.lines)
        .unwrap_or_default()
}

impl From<&ChargeSummary> for Charge {
    fn from(c: &ChargeSummary) -> Charge {
        Charge {
            amount_minor: c.amount_minor,
            currency: c.currency.clone(),
            billed_secs: c.billed_secs,
        }
    }
}

/// The Request-URI of an INVITE to a user or service: a SIP URI as given, else
/// `sip:NAME@DOMAIN`.
pub fn target_uri(target: &str, domain: &str) -> String {
    if is_sip_uri(target) {
        target.to_string()
    } else {
        format!("sip:{target}@{domain}")
    }
}

/// The service's name: the user part of a SIP URI, else what was given.
pub fn service_name(service: &str) -> String {
    if !is_sip_uri(service) {
        return service.to_string();
    }
    let rest = service.split_once(':').map_or(service, |(_, r)| r);
    match rest.split_once('@') {
        Some((user, _)) => user.to_string(),
        None => rest.to_string(),
    }
}

fn is_sip_uri(s: &str) -> bool {
    let lower = s.get(..5).unwrap_or(s).to_ascii_lowercase();
    lower.starts_with("sip:") || lower.starts_with("sips:")
}

/// The body of the INVITE: `--detail` as a service request, or the bytes of `--body-file` once
/// they parse as one.
pub fn request_body(
    detail: Option<&str>,
    body_file: Option<&Path>,
) -> anyhow::Result<Option<Bytes>> {
    if let Some(detail) = detail {
        return Ok(Some(Bytes::from(
            ServiceRequest::with_detail(detail).to_json(),
        )));
    }
    let Some(path) = body_file else {
        return Ok(None);
    };
    let bytes = std::fs::read(path)
        .with_context(|| format!("cannot read --body-file {}", path.display()))?;
    ServiceRequest::parse(&bytes).map_err(|e| {
        anyhow::anyhow!(
            "--body-file {} is not a service request: {e}",
            path.display()
        )
    })?;
    Ok(Some(Bytes::from(bytes)))
}

/// A line typed on standard input while sessions are open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserCommand {
    /// `close`: close every session.
    CloseAll,
    /// `close N`: close session N.
    Close(usize),
    /// `list`: show the live sessions.
    List,
    /// `transfer SERVICE [--keep]`: move to another service (a new session continuing the
    /// first one, which ends unless `--keep`).
    Transfer { service: String, keep: bool },
    /// `change DETAILS`: change the details of every live session (re-INVITE through the
    /// relay, which searches again).
    Change(String),
    /// An empty line.
    Nothing,
    /// Anything else, with the reason it was not understood.
    Unknown(String),
}

pub fn parse_command(line: &str) -> UserCommand {
    let trimmed = line.trim();
    if let Some((word, rest)) = trimmed.split_once(char::is_whitespace) {
        if word.eq_ignore_ascii_case("change") {
            return UserCommand::Change(rest.trim().to_string());
        }
    } else if trimmed.eq_ignore_ascii_case("change") {
        return UserCommand::Unknown(
            "change needs the new details, e.g. change a dark beer".into(),
        );
    }
    let words: Vec<&str> = trimmed.split_whitespace().collect();
    if words
        .first()
        .is_some_and(|w| w.eq_ignore_ascii_case("transfer"))
    {
        let keep = words.iter().skip(1).any(|w| *w == "--keep");
        let rest: Vec<&str> = words
            .iter()
            .skip(1)
            .filter(|w| **w != "--keep")
            .copied()
            .collect();
        return match rest.as_slice() {
            [service] => UserCommand::Transfer {
                service: service.to_string(),
                keep,
            },
            _ => UserCommand::Unknown(
                "transfer needs one service, e.g. transfer beer (add --keep to keep this session)"
                    .into(),
            ),
        };
    }
    let mut words = line.split_whitespace();
    let first = words.next().map(str::to_ascii_lowercase);
    let second = words.next();
    let extra = words.next().is_some();
    match (first.as_deref(), second, extra) {
        (None, _, _) => UserCommand::Nothing,
        (Some("list"), None, _) => UserCommand::List,
        (Some("close"), None, _) => UserCommand::CloseAll,
        (Some("close"), Some(n), false) => match n.parse::<usize>() {
            Ok(n) if n > 0 => UserCommand::Close(n),
            _ => UserCommand::Unknown(format!("{n:?} is not a session number")),
        },
        _ => UserCommand::Unknown(format!(
            "{:?} is not a command (use list, close, close N, change DETAILS or transfer SERVICE [--keep])",
            line.trim()
        )),
    }
}

/// What a refused change tells the user: the relay's 488 names the service to transfer to.
pub fn change_refusal(status: u16, reason: &str, transfer_to: Option<&str>) -> String {
    match transfer_to {
        Some(service) => format!(
            "change refused ({status} {reason}): this session's server does not deliver it; \
             open or transfer to the service {service} instead"
        ),
        None => format!(
            "change refused {}: the session goes on as it was",
            status_note(status, reason)
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::sip::message::Response;

    fn ok_with(headers: &[(&str, &str)], body: &str) -> Response {
        let mut resp = Response::new(200);
        for (n, v) in headers {
            resp.headers.push(n, *v);
        }
        resp.body = Bytes::from(body.to_string());
        resp
    }

    #[test]
    fn access_comes_from_the_body() {
        let body = ServiceAccess {
            url: "https://a.test/s?t=1".into(),
            service: "wine".into(),
            session_id: "s-1".into(),
            server: "vendor-a".into(),
        }
        .to_json();
        let resp = ok_with(
            &[
                (
                    "Content-Type",
                    "Application/Vnd.Sip-Relay.Service-Access+JSON; charset=utf-8",
                ),
                ("Call-Info", "<https://other.test/>;purpose=info"),
            ],
            &body,
        );
        assert_eq!(
            access_from(&resp, "asked"),
            Access {
                url: Some("https://a.test/s?t=1".into()),
                service: "wine".into(),
                server: Some("vendor-a".into()),
                session_id: Some("s-1".into()),
            }
        );
    }

    #[test]
    fn access_falls_back_to_call_info() {
        // An SDP answer (a softphone's INVITE) with the URL in Call-Info.
        let resp = ok_with(
            &[
                ("Content-Type", "application/sdp"),
                (
                    "Call-Info",
                    "<http://icon.test/a.png>;purpose=icon, <https://b.test/x?a=1,2>;Purpose=\"info\"",
                ),
            ],
            "v=0\r\n",
        );
        assert_eq!(
            access_from(&resp, "wine"),
            Access {
                url: Some("https://b.test/x?a=1,2".into()),
                service: "wine".into(),
                server: None,
                session_id: None,
            }
        );
        // A malformed access body does not hide the header.
        let resp = ok_with(
            &[
                ("Content-Type", SERVICE_ACCESS_TYPE),
                ("Call-Info", "<https://c.test/>;purpose=info"),
            ],
            "{not json",
        );
        assert_eq!(
            access_from(&resp, "wine").url.as_deref(),
            Some("https://c.test/")
        );
        // Neither: no URL.
        let resp = ok_with(&[("Call-Info", "<https://d.test/>;purpose=card")], "");
        assert_eq!(access_from(&resp, "wine").url, None);
        let resp = ok_with(&[("Call-Info", "https://e.test/;purpose=info")], "");
        assert_eq!(access_from(&resp, "wine").url, None);
    }

    #[test]
    fn failures_are_told_in_words_with_the_status() {
        let m = |status, reason, retry, challenged| {
            failure_message("wine", status, reason, retry, challenged)
        };
        assert_eq!(
            m(407, "Proxy Authentication Required", None, true),
            "wrong user name or password (407 Proxy Authentication Required)"
        );
        assert_eq!(
            m(401, "Unauthorized", None, true),
            "wrong user name or password (401 Unauthorized)"
        );
        assert_eq!(
            m(404, "Not Found", None, true),
            "no such service: wine (404 Not Found)"
        );
        assert_eq!(
            m(480, "Temporarily Unavailable", None, true),
            "nobody is serving wine right now (480 Temporarily Unavailable)"
        );
        assert_eq!(
            m(486, "Busy Here", Some(30), true),
            "the server is busy; try again in 30 s (486 Busy Here)"
        );
        assert_eq!(
            m(486, "Busy Here", None, true),
            "the server is busy (486 Busy Here)"
        );
        assert_eq!(
            m(600, "Busy Everywhere", Some(5), true),
            "the server is busy; try again in 5 s (600 Busy Everywhere)"
        );
        assert_eq!(
            m(503, "All Servers Full", Some(120), true),
            "the server is busy; try again in 120 s (503 All Servers Full)"
        );
        assert_eq!(
            m(503, "Relay stopping", Some(30), true),
            "the relay is stopping; try again in 30 s (503 Relay stopping)"
        );
        assert_eq!(
            m(403, "Service Not Allowed", None, true),
            "refused: Service Not Allowed (403 Service Not Allowed)"
        );
        assert_eq!(
            m(400, "Service Request Too Large", None, true),
            "the relay rejected the request: Service Request Too Large (400)"
        );
        assert_eq!(
            m(500, "Server Internal Error", None, true),
            "refused (500 Server Internal Error)"
        );
        assert_eq!(m(500, "", None, true), "refused (500)");
    }

    #[test]
    fn retry_after_reads_the_leading_number() {
        let mut h = Headers::default();
        assert_eq!(retry_after(&h), None);
        h.push("Retry-After", "18000;duration=3600");
        assert_eq!(retry_after(&h), Some(18000));
        h.set("Retry-After", " 120 (I'm in a meeting)");
        assert_eq!(retry_after(&h), Some(120));
        h.set("Retry-After", "soon");
        assert_eq!(retry_after(&h), None);
    }

    #[test]
    fn charges_come_from_the_relay_header() {
        let mut h = Headers::default();
        assert_eq!(charge_of(&h), None);
        h.push(
            CHARGE_HEADER,
            "amount=20;currency=EUR;duration-ms=12345;billed-secs=13;session=s-1",
        );
        let c = charge_of(&h).unwrap();
        assert_eq!(
            Charge::from(&c),
            Charge {
                amount_minor: 20,
                currency: "EUR".into(),
                billed_secs: 13
            }
        );
        assert_eq!(c.duration_ms, 12_345);
        h.set(CHARGE_HEADER, "garbage");
        assert_eq!(charge_of(&h), None);
    }

    #[test]
    fn services_are_names_or_uris() {
        assert_eq!(target_uri("wine", "relay.test"), "sip:wine@relay.test");
        assert_eq!(
            target_uri("sip:wine@x.test", "relay.test"),
            "sip:wine@x.test"
        );
        assert_eq!(service_name("SIP:wine@x.test"), "wine");
        assert_eq!(service_name("wine"), "wine");
    }

    #[test]
    fn request_bodies_are_checked() {
        let body = request_body(Some("red, 2015"), None).unwrap().unwrap();
        assert_eq!(
            ServiceRequest::parse(&body).unwrap().detail(),
            Some("red, 2015")
        );
        assert_eq!(request_body(None, None).unwrap(), None);
        let dir = std::env::temp_dir().join(format!("client-agent-body-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.json");
        std::fs::write(&good, br#"{"detail":"red","lang":"fr"}"#).unwrap();
        assert_eq!(
            request_body(None, Some(&good)).unwrap().unwrap(),
            Bytes::from_static(br#"{"detail":"red","lang":"fr"}"#)
        );
        let bad = dir.join("bad.json");
        std::fs::write(&bad, br#"{"n":1}"#).unwrap();
        let err = format!("{:#}", request_body(None, Some(&bad)).unwrap_err());
        assert!(
            err.contains("bad.json") && err.contains("not a service request"),
            "{err}"
        );
        let missing = dir.join("missing.json");
        let err = format!("{:#}", request_body(None, Some(&missing)).unwrap_err());
        assert!(
            err.contains("cannot read --body-file") && err.contains("missing.json"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn commands() {
        assert_eq!(parse_command("close"), UserCommand::CloseAll);
        assert_eq!(parse_command("  close  2 \n"), UserCommand::Close(2));
        assert_eq!(parse_command("LIST"), UserCommand::List);
        assert_eq!(parse_command(""), UserCommand::Nothing);
        assert!(matches!(parse_command("close 0"), UserCommand::Unknown(_)));
        assert!(matches!(parse_command("close x"), UserCommand::Unknown(_)));
        assert!(matches!(
            parse_command("close 1 2"),
            UserCommand::Unknown(_)
        ));
        assert!(matches!(parse_command("quit"), UserCommand::Unknown(_)));
        assert_eq!(
            parse_command("change  a dark beer \n"),
            UserCommand::Change("a dark beer".into())
        );
        assert!(matches!(parse_command("change"), UserCommand::Unknown(_)));
        assert_eq!(
            parse_command("transfer beer"),
            UserCommand::Transfer {
                service: "beer".into(),
                keep: false
            }
        );
        assert_eq!(
            parse_command("Transfer --keep sip:beer@example.com"),
            UserCommand::Transfer {
                service: "sip:beer@example.com".into(),
                keep: true
            }
        );
        assert!(matches!(parse_command("transfer"), UserCommand::Unknown(_)));
        assert!(matches!(
            parse_command("transfer a b"),
            UserCommand::Unknown(_)
        ));
    }
}
