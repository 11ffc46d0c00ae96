//! Events of a run, printed for people or, with `--json`, one JSON object a line for scripts.

use serde::Serialize;

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
    /// A request failed.
    Failed {
        request: String,
        status: u16,
        reason: String,
        message: String,
    },
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
        if self.json {
            if let Ok(line) = serde_json::to_string(event) {
                println!("{line}");
            }
            return;
        }
        match event {
            Event::Registered {
                aor,
                expires,
                bindings,
            } => {
                println!("registered {aor} for {expires} s ({bindings} binding(s))")
            }
            Event::Unregistered { aor } => println!("unregistered {aor}"),
            Event::Ringing { status } => println!("ringing ({status})"),
            Event::Established { call_id, status } => {
                println!("established ({status}), call-id {call_id}")
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
                println!("ended: {reason}{status}{dur}")
            }
            Event::Failed {
                request,
                status,
                reason,
                message,
            } => {
                eprintln!("{request} failed: {message} ({status} {reason})")
            }
        }
    }
}
