//! `relay billing statement`: one user's sessions and what they cost, with totals per currency.
//!
//! Amounts are integer minor units in `json` and `csv`, and formatted with the currency's
//! decimals in `table`. Times are UTC. A session still open is listed without a charge.
use anyhow::bail;
use clap::Subcommand;
use std::collections::BTreeMap;

use super::listing::{self, Format, fixed, flex};
use super::{days_from_civil, format_duration_ms, format_utc_ms};
use crate::store::{Cdr, Store};
use proto::service::format_money;

/// The `relay billing` subcommands.
#[derive(Debug, Subcommand)]
pub enum BillingCommand {
    /// A user's sessions and charges, oldest first, with totals per currency.
    ///
    /// DATE is YYYY-MM-DD (a whole UTC day; --to includes that day) or an instant
    /// YYYY-MM-DDTHH:MM:SSZ. Sessions are picked by when they were requested.
    Statement {
        /// The user (the caller of the sessions).
        #[arg(long, value_name = "NAME")]
        user: String,
        /// From this date (inclusive).
        #[arg(long, value_name = "DATE")]
        from: Option<String>,
        /// Up to this date (inclusive for a day, exclusive for an instant).
        #[arg(long, value_name = "DATE")]
        to: Option<String>,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
}

/// Parses a DATE; `end` makes a day mean "up to the end of that day".
pub fn parse_date_ms(text: &str, end: bool) -> anyhow::Result<i64> {
    let t = text.trim();
    let bad = || anyhow::anyhow!("bad date {t:?}: use YYYY-MM-DD or YYYY-MM-DDTHH:MM:SSZ (UTC)");
    let (date, time) = match t.split_once('T') {
        Some((d, rest)) => (d, Some(rest)),
        None => (t, None),
    };
    let parts: Vec<&str> = date.split('-').collect();
    if parts.len() != 3 || parts[0].len() != 4 || parts[1].len() != 2 || parts[2].len() != 2 {
        return Err(bad());
    }
    let y: i64 = parts[0].parse().map_err(|_| bad())?;
    let m: u32 = parts[1].parse().map_err(|_| bad())?;
    let d: u32 = parts[2].parse().map_err(|_| bad())?;
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return Err(bad());
    }
    let days = days_from_civil(y, m, d);
    // A date that does not exist (2026-02-30) comes back as another day.
    if super::format_utc_ms(days * 86_400_000)[..10] != *date {
        return Err(bad());
    }
    let day_ms = days * 86_400_000;
    match time {
        None => Ok(if end { day_ms + 86_400_000 } else { day_ms }),
        Some(rest) => {
            let rest = rest.strip_suffix('Z').ok_or_else(bad)?;
            let hms: Vec<&str> = rest.split(':').collect();
            if hms.len() != 3 {
                return Err(bad());
            }
            let h: i64 = hms[0].parse().map_err(|_| bad())?;
            let mi: i64 = hms[1].parse().map_err(|_| bad())?;
            let s: i64 = hms[2].parse().map_err(|_| bad())?;
            if !(0..24).contains(&h) || !(0..60).contains(&mi) || !(0..60).contains(&s) {
                return Err(bad());
            }
            Ok(day_ms + (h * 3600 + mi * 60 + s) * 1000)
        }
    }
}

/// Totals per currency: (amount, sessions charged).
pub fn totals(sessions: &[Cdr]) -> BTreeMap<String, (i64, usize)> {
    let mut t: BTreeMap<String, (i64, usize)> = BTreeMap::new();
    for c in sessions {
        if let (Some(amount), Some(cur)) = (c.charge_minor, &c.currency) {
            let e = t.entry(cur.clone()).or_default();
            e.0 = e.0.saturating_add(amount);
            e.1 += 1;
        }
    }
    t
}

pub async fn run(store: &Store, command: BillingCommand) -> anyhow::Result<()> {
    let BillingCommand::Statement {
        user,
        from,
        to,
        format,
    } = command;
    let from_ms = from
        .as_deref()
        .map(|d| parse_date_ms(d, false))
        .transpose()?;
    let to_ms = to.as_deref().map(|d| parse_date_ms(d, true)).transpose()?;
    if let (Some(f), Some(t)) = (from_ms, to_ms) {
        if f >= t {
            bail!("--from must be before --to");
        }
    }
    let sessions = store
        .user_sessions(
            &user,
            from_ms.unwrap_or(i64::MIN),
            to_ms.unwrap_or(i64::MAX),
        )
        .await?;
    print!("{}", render(&user, &sessions, from_ms, to_ms, format)?);
    Ok(())
}

pub fn render(
    user: &str,
    sessions: &[Cdr],
    from_ms: Option<i64>,
    to_ms: Option<i64>,
    format: Format,
) -> anyhow::Result<String> {
    let totals = totals(sessions);
    Ok(match format {
        Format::Json => {
            let list: Vec<serde_json::Value> = sessions
                .iter()
                .map(|c| {
                    serde_json::json!({
                        "id": c.id,
                        "service": c.service,
                        "callee": c.callee,
                        "server": c.server,
                        "details": c.details,
                        "started_at_ms": c.started_at_ms,
                        "ended_at_ms": c.ended_at_ms,
                        "duration_ms": c.duration_ms,
                        "billed_secs": c.billed_secs,
                        "charge_minor": c.charge_minor,
                        "currency": c.currency,
                        "ended_by": c.ended_by,
                        "reason": c.reason,
                        "state": c.state,
                        "resumed_at_ms": c.resumed_at_ms,
                    })
                })
                .collect();
            let totals: Vec<serde_json::Value> = totals
                .iter()
                .map(|(cur, (amount, n))| {
                    serde_json::json!({"currency": cur, "amount_minor": amount, "sessions": n})
                })
                .collect();
            let mut s = serde_json::to_string(&serde_json::json!({
                "user": user,
                "from_ms": from_ms,
                "to_ms": to_ms,
                "sessions": list,
                "totals": totals,
            }))?;
            s.push('\n');
            s
        }
        Format::Csv => {
            let mut out = String::from(
                "kind,id,service,server,started_at,ended_at,duration_ms,billed_secs,charge_minor,currency,reason\r\n",
            );
            for c in sessions {
                let fields = [
                    "session".to_string(),
                    c.id.clone(),
                    c.service.clone().unwrap_or_else(|| c.callee.clone()),
                    c.server.clone().unwrap_or_default(),
                    c.started_at_ms.map(format_utc_ms).unwrap_or_default(),
                    c.ended_at_ms.map(format_utc_ms).unwrap_or_default(),
                    c.duration_ms.map(|v| v.to_string()).unwrap_or_default(),
                    c.billed_secs.map(|v| v.to_string()).unwrap_or_default(),
                    c.charge_minor.map(|v| v.to_string()).unwrap_or_default(),
                    c.currency.clone().unwrap_or_default(),
                    c.reason.clone().unwrap_or_default(),
                ];
                out.push_str(&csv_line(&fields));
            }
            for (cur, (amount, _)) in &totals {
                let fields = [
                    "total".to_string(),
                    String::new(),
                    String::new(),
                    String::new(),
                    String::new(),
                    String::new(),
                    String::new(),
                    String::new(),
                    amount.to_string(),
                    cur.clone(),
                    String::new(),
                ];
                out.push_str(&csv_line(&fields));
            }
            out
        }
        Format::Table => {
            let rows: Vec<Vec<String>> = sessions
                .iter()
                .map(|c| {
                    vec![
                        c.id.chars().take(8).collect(),
                        c.started_at_ms
                            .map(|ms| format_utc_ms(ms)[..16].replace('T', " "))
                            .unwrap_or_default(),
                        c.service.clone().unwrap_or_else(|| c.callee.clone()),
                        c.server.clone().unwrap_or_else(|| "-".into()),
                        c.duration_ms
                            .map(format_duration_ms)
                            .unwrap_or_else(|| "open".into()),
                        c.billed_secs
                            .map(|b| format!("{b}s"))
                            .unwrap_or_else(|| "-".into()),
                        match (c.charge_minor, &c.currency) {
                            (Some(a), Some(cur)) => format_money(a, cur),
                            _ => "-".into(),
                        },
                        c.reason.clone().unwrap_or_else(|| "-".into()),
                    ]
                })
                .collect();
            let mut out = format!(
                "Statement for {user} ({} to {}, UTC)\n",
                from_ms
                    .map(format_utc_ms)
                    .unwrap_or_else(|| "the beginning".into()),
                to_ms.map(format_utc_ms).unwrap_or_else(|| "now".into())
            );
            let columns = [
                fixed("SESSION"),
                fixed("START"),
                flex("SERVICE"),
                flex("SERVER"),
                fixed("DURATION"),
                fixed("BILLED"),
                fixed("CHARGE"),
                flex("ENDED"),
            ];
            out.push_str(&listing::table(
                &columns,
                &rows,
                Some(listing::TERMINAL_WIDTH),
            ));
            if totals.is_empty() {
                out.push_str("Total: nothing charged\n");
            }
            for (cur, (amount, n)) in &totals {
                out.push_str(&format!(
                    "Total {cur}: {} ({n} session{})\n",
                    format_money(*amount, cur),
                    if *n == 1 { "" } else { "s" }
                ));
            }
            out
        }
    })
}

fn csv_line(fields: &[String]) -> String {
    let mut line: Vec<String> = Vec::with_capacity(fields.len());
    for f in fields {
        if f.contains([',', '"', '\n', '\r']) {
            line.push(format!("\"{}\"", f.replace('"', "\"\"")));
        } else {
            line.push(f.clone());
        }
    }
    format!("{}\r\n", line.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_parse_as_utc_days_and_instants() {
        assert_eq!(parse_date_ms("1970-01-02", false).unwrap(), 86_400_000);
        assert_eq!(parse_date_ms("1970-01-01", true).unwrap(), 86_400_000);
        assert_eq!(
            parse_date_ms("2026-11-22T16:25:26Z", false).unwrap(),
            1_795_364_726_000
        );
        assert!(parse_date_ms("2026-02-30", false).is_err());
        assert!(parse_date_ms("22.11.2026", false).is_err());
        assert!(parse_date_ms("2026-11-22T25:00:00Z", false).is_err());
    }

    #[test]
    fn totals_are_per_currency() {
        let c = |amount: i64, cur: &str| Cdr {
            charge_minor: Some(amount),
            currency: Some(cur.into()),
            ..Cdr::default()
        };
        let open = Cdr::default();
        let t = totals(&[c(120, "EUR"), c(5, "EUR"), c(300, "JPY"), open]);
        assert_eq!(t.get("EUR"), Some(&(125, 2)));
        assert_eq!(t.get("JPY"), Some(&(300, 1)));
        assert_eq!(t.len(), 2);
    }
}
