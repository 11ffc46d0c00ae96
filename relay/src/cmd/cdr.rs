//! `relay cdr …`: show call-detail records.
use anyhow::bail;
use clap::{Subcommand, ValueEnum};
use serde_json::Value;

pub use super::listing::Format;
use super::listing::{
    self, Column, Fields, dash, fixed, flex, iso, opt, short_duration, short_time,
};
use super::{format_duration_ms, format_utc_ms};
use crate::store::{Cdr, CdrFilter, CdrState, Party, Store};

/// A record's state, as `--state` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum State {
    /// A session still running (answered or established).
    Live,
    /// A session that ended.
    Ended,
    /// An attempt that made no session.
    Failed,
}

impl State {
    fn stored(self) -> &'static [CdrState] {
        match self {
            State::Live => &[CdrState::Answered, CdrState::Established],
            State::Ended => &[CdrState::Ended],
            State::Failed => &[CdrState::Failed],
        }
    }
}

/// The `relay cdr` subcommands.
#[derive(Debug, Subcommand)]
pub enum CdrCommand {
    /// List call-detail records, newest first.
    ///
    /// `table` fits 80 columns (id shortened to 8 characters, times `MM-DD HH:MM` UTC; names
    /// cut with … when long); `--wide` shows every field whole. `json` and `csv` carry the same
    /// fields under the same names: times both as UTC ISO 8601 (`created_at`, …) and as
    /// milliseconds since the Unix epoch (`created_at_ms`, …), durations in milliseconds,
    /// charges in minor units of the currency, absent values as null (empty in CSV).
    ///
    /// DATE is YYYY-MM-DD (a whole UTC day; --to includes it) or an instant
    /// YYYY-MM-DDTHH:MM:SSZ; records are picked by when the call was requested.
    List {
        /// Only calls where this user is the caller or the callee.
        #[arg(long, value_name = "NAME")]
        user: Option<String>,
        /// Only records in this state.
        #[arg(long, value_enum)]
        state: Option<State>,
        /// Only sessions of this service.
        #[arg(long, value_name = "NAME")]
        service: Option<String>,
        /// Only sessions with this application server.
        #[arg(long, value_name = "NAME")]
        server: Option<String>,
        /// Requested on or after this date.
        #[arg(long, value_name = "DATE")]
        from: Option<String>,
        /// Requested up to this date.
        #[arg(long, value_name = "DATE")]
        to: Option<String>,
        /// At most this many records (the newest).
        #[arg(long, value_name = "N")]
        limit: Option<u32>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
        /// Table: every column, whole, however wide.
        #[arg(long)]
        wide: bool,
    },
}

/// Runs one `relay cdr` subcommand.
pub async fn run(store: &Store, command: CdrCommand) -> anyhow::Result<()> {
    match command {
        CdrCommand::List {
            user,
            state,
            service,
            server,
            from,
            to,
            limit,
            format,
            wide,
        } => {
            let from_ms = from
                .as_deref()
                .map(|d| super::billing::parse_date_ms(d, false))
                .transpose()?;
            let to_ms = to
                .as_deref()
                .map(|d| super::billing::parse_date_ms(d, true))
                .transpose()?;
            if let (Some(f), Some(t)) = (from_ms, to_ms) {
                if f >= t {
                    bail!("--from must be before --to");
                }
            }
            let filter = CdrFilter {
                user,
                states: state.map(|s| s.stored().to_vec()),
                service,
                server,
                from_ms,
                to_ms,
                limit: limit.map(i64::from),
            };
            let cdrs = store.find_cdrs(&filter).await?;
            print!("{}", render(&cdrs, format, wide));
        }
    }
    Ok(())
}

/// The fields of a record in `json` and `csv`, in order.
pub const FIELDS: [&str; 26] = [
    "id",
    "call_id",
    "caller",
    "callee",
    "service",
    "server",
    "state",
    "status",
    "reason",
    "ended_by",
    "created_at",
    "started_at",
    "ended_at",
    "duration_ms",
    "billed_secs",
    "charge_minor",
    "currency",
    "details",
    "created_at_ms",
    "started_at_ms",
    "ended_at_ms",
    "last_alive_ms",
    "resumed_at_ms",
    "owner",
    "segments",
    "transferred_from",
];

fn fields(c: &Cdr) -> Fields {
    let values = [
        Value::from(c.id.clone()),
        Value::from(c.call_id.clone()),
        Value::from(c.caller.clone()),
        Value::from(c.callee.clone()),
        opt(c.service.clone()),
        opt(c.server.clone()),
        Value::from(c.state.as_str()),
        opt(c.status),
        opt(c.reason.clone()),
        opt(c.ended_by.map(Party::as_str)),
        iso(Some(c.created_at_ms)),
        iso(c.started_at_ms),
        iso(c.ended_at_ms),
        opt(c.duration_ms),
        opt(c.billed_secs),
        opt(c.charge_minor),
        opt(c.currency.clone()),
        opt(c.details.clone()),
        Value::from(c.created_at_ms),
        opt(c.started_at_ms),
        opt(c.ended_at_ms),
        opt(c.last_alive_ms),
        opt(c.resumed_at_ms),
        opt(c.owner.clone()),
        // Each segment of a changed service: service, details, times, tariff, billed, charge.
        c.segments
            .as_deref()
            .and_then(|s| serde_json::from_str::<Value>(s).ok())
            .unwrap_or(Value::Null),
        opt(c.transferred_from.clone()),
    ];
    FIELDS.into_iter().zip(values).collect()
}

/// Renders records in the given format (ending with a newline).
pub fn render(cdrs: &[Cdr], format: Format, wide: bool) -> String {
    listing::render(format, &FIELDS, cdrs.iter().map(fields), || {
        if wide {
            wide_table(cdrs)
        } else {
            narrow_table(cdrs)
        }
    })
}

fn charge(c: &Cdr) -> String {
    match (c.charge_minor, c.currency.as_deref()) {
        (Some(a), Some(cur)) => proto::service::format_money(a, cur),
        _ => "-".to_owned(),
    }
}

/// The state for people: `ended`, `failed 486`, `live`, with `(resumed)` after a restart.
fn state(c: &Cdr) -> String {
    let base = match c.state {
        CdrState::Failed => match c.status {
            Some(s) => format!("failed {s}"),
            None => "failed".to_owned(),
        },
        CdrState::Answered | CdrState::Established => "live".to_owned(),
        other => other.as_str().to_owned(),
    };
    if c.resumed_at_ms.is_some() {
        format!("{base} (resumed)")
    } else {
        base
    }
}

fn narrow_table(cdrs: &[Cdr]) -> String {
    let columns: [Column; 8] = [
        fixed("ID"),
        fixed("REQUESTED"),
        flex("CALLER"),
        flex("CALLEE"),
        flex("SERVER"),
        fixed("DURATION"),
        fixed("STATE"),
        fixed("CHARGE"),
    ];
    let rows: Vec<Vec<String>> = cdrs
        .iter()
        .map(|c| {
            vec![
                c.id.chars().take(8).collect(),
                short_time(c.created_at_ms),
                c.caller.clone(),
                c.callee.clone(),
                dash(c.server.clone().unwrap_or_default()),
                dash(c.duration_ms.map(short_duration).unwrap_or_default()),
                state(c),
                charge(c),
            ]
        })
        .collect();
    listing::table(&columns, &rows, Some(listing::TERMINAL_WIDTH))
}

fn wide_table(cdrs: &[Cdr]) -> String {
    let columns: Vec<Column> = [
        "ID", "CREATED", "CALL-ID", "CALLER", "CALLEE", "SERVER", "START", "END", "DURATION",
        "ENDED-BY", "STATUS", "REASON", "STATE", "CHARGE", "DETAILS", "NODE",
    ]
    .into_iter()
    .map(fixed)
    .collect();
    let time = |ms: Option<i64>| dash(ms.map(format_utc_ms).unwrap_or_default());
    let rows: Vec<Vec<String>> = cdrs
        .iter()
        .map(|c| {
            vec![
                c.id.clone(),
                format_utc_ms(c.created_at_ms),
                c.call_id.clone(),
                c.caller.clone(),
                c.callee.clone(),
                dash(c.server.clone().unwrap_or_default()),
                time(c.started_at_ms),
                time(c.ended_at_ms),
                dash(c.duration_ms.map(format_duration_ms).unwrap_or_default()),
                dash(c.ended_by.map(Party::as_str).unwrap_or_default().to_owned()),
                dash(c.status.map(|s| s.to_string()).unwrap_or_default()),
                dash(c.reason.clone().unwrap_or_default()),
                if c.resumed_at_ms.is_some() {
                    format!("{} (resumed)", c.state)
                } else {
                    c.state.as_str().to_owned()
                },
                charge(c),
                dash(c.details.clone().unwrap_or_default()),
                dash(c.owner.clone().unwrap_or_default()),
            ]
        })
        .collect();
    listing::table(&columns, &rows, None)
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
            ended_by: Some(Party::Caller),
            status: Some(200),
            reason: Some("bye".into()),
            state: CdrState::Ended,
            ..Cdr::default()
        }
    }

    #[test]
    fn csv_and_json_have_the_same_fields() {
        let out = render(&[sample()], Format::Csv, false);
        let mut lines = out.lines();
        let header: Vec<&str> = lines.next().unwrap().split(',').collect();
        assert_eq!(header, FIELDS);
        let line = lines.next().unwrap();
        assert!(
            line.starts_with(
                "0123456789abcdef,\"abc,\"\"x\"\"@h\",alice,bob,,,ended,200,bye,caller,"
            ),
            "{line}"
        );
        let json = render(&[sample()], Format::Json, false);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        let keys: Vec<&str> = v[0]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let mut expected = FIELDS.to_vec();
        expected.sort_unstable();
        assert_eq!(keys, expected);
        assert_eq!(v[0]["duration_ms"], 12_345);
        assert_eq!(v[0]["created_at"], "2026-11-22T16:25:14.000Z");
        assert_eq!(render(&[], Format::Json, false), "[]\n");
    }

    #[test]
    fn the_table_fits_80_columns() {
        let mut long = sample();
        long.caller = "a-customer-with-a-very-long-name".into();
        long.callee = "a-service-with-an-even-longer-name".into();
        long.server = Some("vendor-with-a-long-account".into());
        long.charge_minor = Some(123_456);
        long.currency = Some("EUR".into());
        let out = render(&[sample(), long], Format::Table, false);
        for line in out.lines() {
            assert!(line.chars().count() <= 80, "{} > 80: {line}", line.len());
        }
        let row = out.lines().nth(1).unwrap();
        assert!(row.starts_with("01234567  11-22 16:25  alice"), "{row}");
        assert!(row.contains("12s") && row.contains("ended"), "{row}");
        let wide = render(&[sample()], Format::Table, true);
        assert!(
            wide.contains("0123456789abcdef") && wide.contains("12.345s"),
            "{wide}"
        );
    }
}
