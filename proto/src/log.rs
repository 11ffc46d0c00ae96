//! Writing what came from the network into log lines, the two log formats, and whether log
//! lines may be coloured.
//!
//! [`Esc`] shows a string with its control characters escaped (`\r`, `\n`, `\t`, `\x1b`, …), so a
//! user name, a Call-ID or a reason phrase cannot forge a log line or drive a terminal.
//!
//! [`init`] sets up every program's log on standard error: lines for people (`text`, the
//! default) or one JSON object a line (`json`) for a log collector. In JSON the programs also
//! open a span per transaction and per session ([`spans`]), so each line carries the Call-ID
//! and the session id of what it is about.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};

/// How log lines are written (`--log-format`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Lines for people: time, level, target, message, fields.
    #[default]
    Text,
    /// One JSON object a line: `timestamp`, `level`, `target`, `fields` (`message` among them),
    /// and `span`/`spans` (the transaction's and the session's Call-ID and session id).
    Json,
}

static SPANS: AtomicBool = AtomicBool::new(false);

/// Whether the programs open spans for transactions and sessions (only the JSON format shows
/// them; in text they would only cost time).
pub fn spans() -> bool {
    SPANS.load(Ordering::Relaxed)
}

/// Installs the log writer on standard error with `filter` (a `tracing` filter such as
/// `info,relay=debug`). Fails on a bad filter; a writer installed before (a test harness)
/// stays.
pub fn init(filter: &str, format: LogFormat) -> Result<(), String> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .map_err(|e| format!("bad log filter {filter:?}: {e}"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let installed = match format {
        LogFormat::Text => builder.with_ansi(colours()).try_init().is_ok(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .try_init()
            .is_ok(),
    };
    if installed && format == LogFormat::Json {
        SPANS.store(true, Ordering::Relaxed);
    }
    Ok(())
}

/// Whether log lines on standard error may carry colours: only on a terminal, and never with
/// `NO_COLOR` set (logs often go to files and journals).
pub fn colours() -> bool {
    std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("NO_COLOR").is_none()
}

/// A string shown with control characters escaped; everything else as it is.
#[derive(Debug, Clone, Copy)]
pub struct Esc<'a>(pub &'a str);

impl fmt::Display for Esc<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0;
        let mut start = 0;
        for (i, c) in s.char_indices() {
            if !c.is_control() && c != '\\' {
                continue;
            }
            f.write_str(&s[start..i])?;
            match c {
                '\r' => f.write_str("\\r")?,
                '\n' => f.write_str("\\n")?,
                '\t' => f.write_str("\\t")?,
                '\\' => f.write_str("\\\\")?,
                c => write!(f, "\\u{{{:x}}}", u32::from(c))?,
            }
            start = i + c.len_utf8();
        }
        f.write_str(&s[start..])
    }
}

#[cfg(test)]
mod tests {
    use super::Esc;

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(Esc("alice").to_string(), "alice");
        assert_eq!(
            Esc("a\r\nINFO forged line").to_string(),
            "a\\r\\nINFO forged line"
        );
        assert_eq!(Esc("\u{1b}[31mred").to_string(), "\\u{1b}[31mred");
        assert_eq!(Esc("tab\there").to_string(), "tab\\there");
        assert_eq!(Esc("back\\slash").to_string(), "back\\\\slash");
        assert_eq!(Esc("\u{7f}").to_string(), "\\u{7f}");
        assert_eq!(Esc("müller").to_string(), "müller");
    }
}
