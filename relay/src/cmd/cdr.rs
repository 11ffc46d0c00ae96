//! `relay cdr …`: show call-detail records.
use clap::{Subcommand, ValueEnum};

use super::user::table;
use super::{format_duration_ms, format_utc_ms};
use crate::store::{Cdr, Store};

/// The `relay cdr` subcommands.
#[derive(Debug, Subcommand)]
pub enum CdrCommand {
    /// List call-detail records, newest first.
    ///
    /// Formats: `table` (aligned columns for people; times in UTC ISO 8601, ids shortened to
    /// 8 characters, the callee or service, the server, the charge); `json` (one JSON array of record objects with the store's fields, times
    /// as UTC milliseconds since the Unix epoch, absent values as null); `csv` (RFC 4180, a
    /// header row, full ids, times in UTC ISO 8601, duration in milliseconds, absent values
    /// empty).
    List {
        /// Only calls where this user is the caller or the callee.
        #[arg(long, value_name = "NAME")]
        user: Option<String>,
        /// At most this many records.
        #[arg(long, value_name = "N")]
        limit: Option<u32>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
}

/// Output format of `relay cdr list`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Aligned columns.
    Table,
    /// One JSON array.
    Json,
    /// Comma-separated values with a header row.
    Csv,
}

/// Runs one `relay cdr` subcommand.
pub async fn run(store: &Store, command: CdrCommand) -> anyhow::Result<()> {
    match command {
        CdrCommand::List {
            user,
            limit,
            format,
        } => {
            let cdrs = store
                .list_cdrs(user.as_deref(), limit.map(i64::from))
                .await?;
            print!("{}", render(&cdrs, format)?);
        }
    }
    Ok(())
}

/// Renders records in the given format (ending with a newline).
pub fn render(cdrs: &[Cdr], format: Format) -> anyhow::Result<String> {
    Ok(match format {
        Format::Table => render_table(cdrs),
        Format::Json => {
            let mut s = serde_json::to_string(cdrs)?;
            s.push('\n');
            s
        }
        Format::Csv => render_csv(cdrs),
    })
}

fn opt_time(ms: Option<i64>) -> String {
    ms.map(format_utc_ms).unwrap_or_default()
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_default()
}

fn dash(s: String) -> String {
    if s.is_empty() { "-".to_owned() } else { s }
}

fn render_table(cdrs: &[Cdr]) -> String {
    let header = [
        "ID", "CREATED", "CALL-ID", "CALLER", "CALLEE", "SERVER", "START", "END", "DURATION",
        "ENDED-BY", "STATUS", "REASON", "STATE", "CHARGE",
    ];
    let rows: Vec<[String; 14]> = cdrs
        .iter()
        .map(|c| {
            [
                c.id.chars().take(8).collect(),
                format_utc_ms(c.created_at_ms),
                c.call_id.clone(),
                c.caller.clone(),
                c.callee.clone(),
                dash(opt(c.server.as_deref())),
                dash(opt_time(c.started_at_ms)),
                dash(opt_time(c.ended_at_ms)),
                dash(c.duration_ms.map(format_duration_ms).unwrap_or_default()),
                dash(opt(c.ended_by.as_deref())),
                dash(opt(c.status)),
                dash(opt(c.reason.as_deref())),
                if c.resumed_at_ms.is_some() {
                    format!("{} (resumed)", c.state)
                } else {
                    c.state.clone()
                },
                match (c.charge_minor, c.currency.as_deref()) {
                    (Some(a), Some(cur)) => proto::service::format_money(a, cur),
                    _ => "-".to_owned(),
                },
            ]
        })
        .collect();
    table(&header, &rows)
}

/// One CSV field, quoted when it holds a comma, a quote or a line break (RFC 4180).
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

fn render_csv(cdrs: &[Cdr]) -> String {
    let mut out = String::from(
        "id,call_id,caller,callee,created_at,started_at,ended_at,duration_ms,ended_by,status,reason,state,\
         service,server,details,billed_secs,charge_minor,currency,last_alive_at,resumed_at\r\n",
    );
    for c in cdrs {
        let fields = [
            c.id.clone(),
            c.call_id.clone(),
            c.caller.clone(),
            c.callee.clone(),
            format_utc_ms(c.created_at_ms),
            opt_time(c.started_at_ms),
            opt_time(c.ended_at_ms),
            opt(c.duration_ms),
            opt(c.ended_by.as_deref()),
            opt(c.status),
            opt(c.reason.as_deref()),
            c.state.clone(),
            opt(c.service.as_deref()),
            opt(c.server.as_deref()),
            opt(c.details.as_deref()),
            opt(c.billed_secs),
            opt(c.charge_minor),
            opt(c.currency.as_deref()),
            opt_time(c.last_alive_ms),
            opt_time(c.resumed_at_ms),
        ];
        let line: Vec<String> = fields.iter().map(|f| csv_field(f)).collect();
        out.push_str(&line.join(","));
        out.push_str("\r\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Cdr {
        Cdr {
            id: "0123456789abcdef".into(),
            call_id: "abc,\"x\"@h".into(),
            caller: "alice".into(),
            callee: "bob".into(),
            created_at_ms: 1_795_364_714_000,
            started_at_ms: Some(1_795_364_714_000),
            ended_at_ms: Some(1_795_364_726_345),
            duration_ms: Some(12_345),
            ended_by: Some("caller".into()),
            status: Some(200),
            reason: Some("bye".into()),
            state: "ended".into(),
            ..Cdr::default()
        }
    }

    #[test]
    fn csv_quotes() {
        let out = render(&[sample()], Format::Csv).unwrap();
        let line = out.lines().nth(1).unwrap();
        assert!(
            line.starts_with("0123456789abcdef,\"abc,\"\"x\"\"@h\",alice,bob,"),
            "{line}"
        );
        assert!(
            line.ends_with(",12345,caller,200,bye,ended,,,,,,,,"),
            "{line}"
        );
    }

    #[test]
    fn table_row() {
        let out = render(&[sample()], Format::Table).unwrap();
        let row = out.lines().nth(1).unwrap();
        assert!(
            row.starts_with("01234567  2026-11-22T16:25:14.000Z"),
            "{row}"
        );
        assert!(row.contains("12.345s"), "{row}");
    }

    #[test]
    fn json_array() {
        let out = render(&[sample()], Format::Json).unwrap();
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v[0]["duration_ms"], 12_345);
        assert_eq!(render(&[], Format::Json).unwrap(), "[]\n");
    }
}
