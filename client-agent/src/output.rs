//! Events of a run, printed for people or, with `--json`, one JSON object a line for scripts.

use serde::Serialize;
use std::borrow::Cow;

/// Who changed a session's service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ChangedBy {
    Client,
    Server,
}

/// Something that happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum Event {
    /// The relay accepted a registration.
    Registered {
        aor: String,
        expires: u32,
        bindings: usize,
    },
    /// The relay removed the registration.
    Unregistered { aor: String },
    /// The callee is being alerted (18x).
    Ringing { status: u16 },
    /// The call is up (2xx relayed, ACK sent).
    Established { call_id: String, status: u16 },
    /// The call or attempt is over.
    Ended {
        reason: String,
        status: Option<u16>,
        duration_ms: Option<u64>,
    },
    /// A request failed. `message` is the whole sentence for people, status included
    /// (`no such service: wine (404 Not Found)`); `retry_after` is the response's Retry-After in
    /// seconds. A transaction that timed out reports 408 `Request Timeout`.
    Failed {
        request: String,
        status: u16,
        reason: String,
        retry_after: Option<u64>,
        message: String,
    },
    /// A service session is open (`open`): an application server answered 2xx and was ACKed.
    /// `index` counts from 1 in the order the answers came.
    Session {
        index: usize,
        /// The session this one continues (a transfer, or the server's REFER followed).
        #[serde(skip_serializing_if = "Option::is_none")]
        transferred_from: Option<usize>,
        service: String,
        /// The application server account, when its answer named it.
        server: Option<String>,
        session_id: Option<String>,
        /// Where to use the service; `None` when the answer carried no URL.
        url: Option<String>,
    },
    /// A service session is over.
    Closed {
        index: usize,
        by: ClosedBy,
        /// The relay's measure when it reported a charge, else ours.
        duration_ms: u64,
        /// `None`: the relay reported no charge.
        charge: Option<Charge>,
        /// What the application server charged in the session (items, refunds negative), as
        /// the relay's bill listed them.
        items: Vec<proto::charge::BillLine>,
        session_id: Option<String>,
        /// The final status of our BYE (`408` when it got none); `None` when the server hung up.
        status: Option<u16>,
        /// Why the relay ended it (`by` is `relay`): `max-duration`, `callee-gone`, …
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// The live service sessions (answer to `list`).
    Sessions { sessions: Vec<SessionInfo> },
    /// The relay watches for a target that is not registered (`--wait`): it will be called
    /// when it registers, until `until` (UTC).
    Watching {
        target: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        until: Option<String>,
    },
    /// A session's service changed: asked by you (`change`) or by the server.
    Changed {
        index: usize,
        by: ChangedBy,
        service: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        detail: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        url: Option<String>,
    },
    /// A change you asked for was refused; the session goes on as it was. `transfer_to`: the
    /// service the relay found for what you asked, delivered by another server (transfer to it).
    ChangeRefused {
        index: usize,
        status: u16,
        reason: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        transfer_to: Option<String>,
        message: String,
    },
    /// Something the user should know that is not an outcome (a URL not opened, a bad command).
    Note { message: String },
}

/// Who ended a service session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ClosedBy {
    Client,
    Server,
    /// The relay ended it (maximum duration, a vanished party, its own stop).
    Relay,
}

/// The time charge of a session as the relay reported it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Charge {
    /// Integer minor units of `currency`.
    pub amount_minor: i64,
    pub currency: String,
    pub billed_secs: i64,
}

/// A live service session, as `list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SessionInfo {
    pub index: usize,
    pub service: String,
    pub server: Option<String>,
    pub session_id: Option<String>,
    pub url: Option<String>,
    /// How long it has been open.
    pub elapsed_ms: u64,
    /// A BYE was sent and awaits its answer.
    pub closing: bool,
}

/// Where events go: standard output (human or JSON lines), and optionally a channel for programs
/// that run the agent in-process.
#[derive(Debug, Clone, Default)]
pub struct Output {
    pub json: bool,
    pub sink: Option<tokio::sync::mpsc::UnboundedSender<Event>>,
}

impl Output {
    pub fn emit(&self, event: &Event) {
        if let Some(sink) = &self.sink {
            let _ = sink.send(event.clone());
            return;
        }
        // A closed standard output or error (`| head`) loses the line, never the session:
        // no panic from println!.
        use std::io::Write as _;
        if self.json {
            if let Ok(line) = serde_json::to_string(event) {
                let _ = writeln!(std::io::stdout().lock(), "{line}");
            }
            return;
        }
        match event {
            Event::Failed {
                request, message, ..
            } => {
                let _ = writeln!(
                    std::io::stderr().lock(),
                    "{request} failed: {}",
                    clean(message)
                );
            }
            Event::Note { message } => {
                let _ = writeln!(std::io::stderr().lock(), "note: {}", clean(message));
            }
            _ => {
                let _ = writeln!(std::io::stdout().lock(), "{}", human(event));
            }
        }
    }
}

/// The line a person sees for an event (without the `failed`/`note` prefixes, which go to
/// standard error).
pub fn human(event: &Event) -> String {
    match event {
        Event::Registered {
            aor,
            expires,
            bindings,
        } => format!("registered {aor} for {expires} s ({bindings} binding(s))"),
        Event::Unregistered { aor } => format!("unregistered {aor}"),
        Event::Ringing { status } => format!("ringing ({status})"),
        Event::Established { call_id, status } => {
            format!("established ({status}), call-id {call_id}")
        }
        Event::Ended {
            reason,
            status,
            duration_ms,
        } => {
            let status = status.map(|s| format!(" ({s})")).unwrap_or_default();
            let dur = duration_ms
                .map(|d| format!(" after {}.{:03} s", d / 1000, d % 1000))
                .unwrap_or_default();
            format!("ended: {reason}{status}{dur}")
        }
        Event::Failed { message, .. }
        | Event::Note { message }
        | Event::ChangeRefused { message, .. } => clean(message).into_owned(),
        Event::Watching { target, until } => match until {
            Some(u) => format!(
                "{} is not here: the relay will call it for you when it registers (until {u}); Ctrl-C stops waiting",
                clean(target)
            ),
            None => format!(
                "{} is not here: the relay will call it for you when it registers",
                clean(target)
            ),
        },
        Event::Changed {
            index,
            by,
            service,
            detail,
            url,
        } => {
            let who = match by {
                ChangedBy::Client => "changed",
                ChangedBy::Server => "changed by the server",
            };
            let detail = detail
                .as_deref()
                .map(|d| format!(" ({})", clean(d)))
                .unwrap_or_default();
            let url = url
                .as_deref()
                .map(|u| format!(": {}", clean(u)))
                .unwrap_or_default();
            format!("session {index} {who}: now {}{detail}{url}", clean(service))
        }
        Event::Session {
            index,
            transferred_from,
            service,
            server,
            url,
            ..
        } => {
            let continues = transferred_from
                .map(|n| format!(" (continues session {n})"))
                .unwrap_or_default();
            format!(
                "session {index}{continues}: {}",
                session_line(service, server.as_deref(), url.as_deref())
            )
        }
        Event::Closed {
            index,
            by,
            duration_ms,
            charge,
            items,
            status,
            reason,
            ..
        } => {
            let who = match (by, reason) {
                (ClosedBy::Client, _) => "you".to_string(),
                (ClosedBy::Server, _) => "the server".to_string(),
                (ClosedBy::Relay, Some(r)) => format!("the relay ({})", clean(r)),
                (ClosedBy::Relay, None) => "the relay".to_string(),
            };
            let answer = match status {
                Some(s) if !(200..300).contains(s) => format!(" (BYE answered {s})"),
                _ => String::new(),
            };
            let time = charge
                .as_ref()
                .map(|c| (clean(&c.currency).into_owned(), c.amount_minor));
            let charge = match charge {
                Some(c) => format!(
                    "charge {} (billed {} s)",
                    proto::service::format_money(c.amount_minor, &clean(&c.currency)),
                    c.billed_secs
                ),
                None => "charge: not reported".to_string(),
            };
            let mut bill = String::new();
            for i in items {
                bill.push_str(&format!(
                    "\n  {} {} x {}: {}",
                    if i.kind == "refund" { "refund" } else { "item" },
                    i.quantity,
                    clean(&i.name),
                    proto::service::format_money(i.amount_minor, &clean(&i.currency))
                ));
            }
            if !items.is_empty() {
                // Totals per currency: the time charge and the items.
                let mut totals: std::collections::BTreeMap<String, i64> = Default::default();
                if let Some((cur, amount)) = time {
                    *totals.entry(cur).or_default() += amount;
                }
                for i in items {
                    let t = totals.entry(clean(&i.currency).into_owned()).or_default();
                    *t = t.saturating_add(i.amount_minor);
                }
                for (cur, amount) in totals {
                    bill.push_str(&format!(
                        "\n  total {}",
                        proto::service::format_money(amount, &cur)
                    ));
                }
            }
            format!(
                "session {index} closed by {who} after {}{answer}: {charge}{bill}",
                seconds(*duration_ms)
            )
        }
        Event::Sessions { sessions } => {
            if sessions.is_empty() {
                return "no live sessions".to_string();
            }
            sessions
                .iter()
                .map(|s| {
                    format!(
                        "session {}: {} (open {}{})",
                        s.index,
                        session_line(&s.service, s.server.as_deref(), s.url.as_deref()),
                        seconds(s.elapsed_ms),
                        if s.closing { ", closing" } else { "" }
                    )
                })
                .collect::<Vec<_>>()
                .join("\n")
        }
    }
}

/// `SERVICE by SERVER: URL`, leaving out what is unknown.
fn session_line(service: &str, server: Option<&str>, url: Option<&str>) -> String {
    let by = server
        .map(|s| format!(" by {}", clean(s)))
        .unwrap_or_default();
    let url = match url {
        Some(u) => format!(": {}", clean(u)),
        None => " (no URL given)".to_string(),
    };
    format!("{}{by}{url}", clean(service))
}

/// `12.3 s`.
fn seconds(ms: u64) -> String {
    format!("{}.{} s", ms / 1000, (ms % 1000) / 100)
}

/// Text from the network without control characters, so it cannot drive the terminal.
fn clean(s: &str) -> Cow<'_, str> {
    if s.chars().any(char::is_control) {
        Cow::Owned(
            s.chars()
                .map(|c| if c.is_control() { '?' } else { c })
                .collect(),
        )
    } else {
        Cow::Borrowed(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn closed(by: ClosedBy, charge: Option<Charge>, status: Option<u16>) -> Event {
        Event::Closed {
            index: 2,
            by,
            duration_ms: 12_345,
            charge,
            items: Vec::new(),
            session_id: Some("s-1".into()),
            status,
            reason: (by == ClosedBy::Relay).then(|| "max-duration".to_string()),
        }
    }

    #[test]
    fn a_bill_lists_items_and_totals_per_currency() {
        let mut e = closed(ClosedBy::Client, Some(eur(240)), Some(200));
        if let Event::Closed { items, .. } = &mut e {
            items.push(proto::charge::BillLine {
                kind: "charge".into(),
                name: "Riesling".into(),
                quantity: 2,
                amount_minor: 2500,
                currency: "EUR".into(),
            });
            items.push(proto::charge::BillLine {
                kind: "refund".into(),
                name: "Riesling".into(),
                quantity: 1,
                amount_minor: -1250,
                currency: "EUR".into(),
            });
        }
        let text = human(&e);
        assert!(text.contains("item 2 x Riesling: 25.00 EUR"), "{text}");
        assert!(text.contains("refund 1 x Riesling: -12.50 EUR"), "{text}");
        assert!(text.ends_with("total 14.90 EUR"), "{text}");
        let json = serde_json::to_value(&e).unwrap_or_default();
        assert_eq!(json["items"][0]["amount_minor"], 2500, "{json}");
    }

    fn eur(amount_minor: i64) -> Charge {
        Charge {
            amount_minor,
            currency: "EUR".into(),
            billed_secs: 13,
        }
    }

    #[test]
    fn session_events_read_as_the_spec_says() {
        let open = Event::Session {
            index: 1,
            transferred_from: None,
            service: "wine".into(),
            server: Some("vendor-a".into()),
            session_id: Some("s-1".into()),
            url: Some("https://a.test/s?t=1".into()),
        };
        assert_eq!(
            human(&open),
            "session 1: wine by vendor-a: https://a.test/s?t=1"
        );
        assert_eq!(
            serde_json::to_string(&open).unwrap(),
            r#"{"event":"session","index":1,"service":"wine","server":"vendor-a","session_id":"s-1","url":"https://a.test/s?t=1"}"#
        );
        let moved = Event::Session {
            index: 2,
            transferred_from: Some(1),
            service: "tea".into(),
            server: Some("teahouse".into()),
            session_id: Some("s-2".into()),
            url: None,
        };
        assert_eq!(
            human(&moved),
            "session 2 (continues session 1): tea by teahouse (no URL given)"
        );
        assert!(
            serde_json::to_string(&moved)
                .unwrap()
                .contains(r#""transferred_from":1"#)
        );
        let changed = Event::Changed {
            index: 1,
            by: ChangedBy::Server,
            service: "beer".into(),
            detail: Some("a stout".into()),
            url: Some("https://a.test/s?t=1".into()),
        };
        assert_eq!(
            human(&changed),
            "session 1 changed by the server: now beer (a stout): https://a.test/s?t=1"
        );
        assert_eq!(
            human(&closed(ClosedBy::Client, Some(eur(20)), Some(200))),
            "session 2 closed by you after 12.3 s: charge 0.20 EUR (billed 13 s)"
        );
        assert_eq!(
            human(&closed(ClosedBy::Server, None, None)),
            "session 2 closed by the server after 12.3 s: charge: not reported"
        );
        assert_eq!(
            human(&closed(ClosedBy::Client, None, Some(481))),
            "session 2 closed by you after 12.3 s (BYE answered 481): charge: not reported"
        );
        assert_eq!(
            human(&closed(ClosedBy::Relay, Some(eur(20)), None)),
            "session 2 closed by the relay (max-duration) after 12.3 s: charge 0.20 EUR (billed 13 s)"
        );
        assert_eq!(
            serde_json::to_string(&closed(ClosedBy::Relay, None, None)).unwrap(),
            r#"{"event":"closed","index":2,"by":"relay","duration_ms":12345,"charge":null,"items":[],"session_id":"s-1","status":null,"reason":"max-duration"}"#
        );
        assert_eq!(
            serde_json::to_string(&closed(ClosedBy::Server, Some(eur(20)), None)).unwrap(),
            r#"{"event":"closed","index":2,"by":"server","duration_ms":12345,"charge":{"amount_minor":20,"currency":"EUR","billed_secs":13},"items":[],"session_id":"s-1","status":null}"#
        );
    }

    #[test]
    fn failures_lists_and_notes() {
        let failed = Event::Failed {
            request: "INVITE".into(),
            status: 486,
            reason: "Busy Here".into(),
            retry_after: Some(30),
            message: "the server is busy; try again in 30 s (486 Busy Here)".into(),
        };
        assert_eq!(
            serde_json::to_string(&failed).unwrap(),
            r#"{"event":"failed","request":"INVITE","status":486,"reason":"Busy Here","retry_after":30,"message":"the server is busy; try again in 30 s (486 Busy Here)"}"#
        );
        assert_eq!(
            human(&Event::Sessions { sessions: vec![] }),
            "no live sessions"
        );
        let list = Event::Sessions {
            sessions: vec![SessionInfo {
                index: 3,
                service: "wine".into(),
                server: None,
                session_id: None,
                url: Some("https://b.test/\x1b[2J".into()),
                elapsed_ms: 1_050,
                closing: true,
            }],
        };
        assert_eq!(
            human(&list),
            "session 3: wine: https://b.test/?[2J (open 1.0 s, closing)"
        );
    }
}
