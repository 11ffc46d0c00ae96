//! `relay billing statement`: one user's sessions, items and refunds, with totals per currency;
//! `relay billing settlement`: what an application server earned, the operator's fee and the net.
//!
//! Amounts are integer minor units in `json` and `csv`, and formatted with the currency's
//! decimals in `table`. Times are UTC. A session still open is listed without a time charge.
//! The money rule: totals are sums of their lines; the fee is rounded half up to a whole minor
//! unit once per currency total (`relay::ledger::fee`), and the net is gross - fee.
use anyhow::bail;
use clap::Subcommand;

use super::listing::{self, Format, fixed, flex};
use super::{days_from_civil, format_duration_ms, format_utc_ms};
use crate::ledger::report::{self, Line, Total};
use crate::store::{Cdr, ChargeRow, Store};
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
    /// What an application server earned (time charges of its sessions, items, less refunds),
    /// the operator's fee (`relay appserver update NAME --fee-percent P`) and the net, per
    /// currency.
    ///
    /// The fee is rounded half up to a whole minor unit, once per currency total.
    Settlement {
        /// The application server account.
        #[arg(long, value_name = "NAME")]
        appserver: String,
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

fn window(from: Option<&str>, to: Option<&str>) -> anyhow::Result<(Option<i64>, Option<i64>)> {
    let from_ms = from.map(|d| parse_date_ms(d, false)).transpose()?;
    let to_ms = to.map(|d| parse_date_ms(d, true)).transpose()?;
    if let (Some(f), Some(t)) = (from_ms, to_ms)
        && f >= t
    {
        bail!("--from must be before --to");
    }
    Ok((from_ms, to_ms))
}

pub async fn run(store: &Store, command: BillingCommand) -> anyhow::Result<()> {
    match command {
        BillingCommand::Statement {
            user,
            from,
            to,
            format,
        } => {
            let (from_ms, to_ms) = window(from.as_deref(), to.as_deref())?;
            let sessions = store
                .user_sessions(
                    &user,
                    from_ms.unwrap_or(i64::MIN),
                    to_ms.unwrap_or(i64::MAX),
                )
                .await?;
            let charges = store
                .list_charges(Some(&user), None, from_ms, to_ms)
                .await?;
            print!(
                "{}",
                render(&user, &sessions, &charges, from_ms, to_ms, format)?
            );
        }
        BillingCommand::Settlement {
            appserver,
            from,
            to,
            format,
        } => {
            let (from_ms, to_ms) = window(from.as_deref(), to.as_deref())?;
            let Some((fee_bp, sessions, charges)) =
                store.settlement_rows(&appserver, from_ms, to_ms).await?
            else {
                return Err(crate::store::StoreError::NoSuchAppServer(appserver).into());
            };
            print!(
                "{}",
                render_settlement(
                    &appserver, fee_bp, &sessions, &charges, from_ms, to_ms, format
                )?
            );
        }
    }
    Ok(())
}

fn period(from_ms: Option<i64>, to_ms: Option<i64>) -> String {
    format!(
        "{} to {}, UTC",
        from_ms
            .map(format_utc_ms)
            .unwrap_or_else(|| "the beginning".into()),
        to_ms.map(format_utc_ms).unwrap_or_else(|| "now".into())
    )
}

fn short_time(ms: i64) -> String {
    format_utc_ms(ms)[..16].replace('T', " ")
}

/// The items and refunds among `lines` as a table (empty when there are none).
fn items_table(lines: &[Line]) -> String {
    let rows: Vec<Vec<String>> = lines
        .iter()
        .filter(|l| l.kind != "time")
        .map(|l| {
            vec![
                l.session_id.chars().take(8).collect(),
                short_time(l.at_ms),
                l.appserver.clone().unwrap_or_default(),
                l.item_name.clone().unwrap_or_default(),
                l.quantity.to_string(),
                format_money(l.unit_price_minor, &l.currency),
                format_money(l.amount_minor, &l.currency),
                l.kind.to_string(),
            ]
        })
        .collect();
    if rows.is_empty() {
        return String::new();
    }
    let columns = [
        fixed("SESSION"),
        fixed("AT"),
        flex("VENDOR"),
        flex("ITEM"),
        fixed("QTY"),
        fixed("PRICE"),
        fixed("AMOUNT"),
        fixed("KIND"),
    ];
    listing::table(&columns, &rows, Some(listing::TERMINAL_WIDTH))
}

fn total_json(t: &Total) -> serde_json::Value {
    serde_json::json!({
        "currency": t.currency,
        "amount_minor": t.total_minor,
        "time_minor": t.time_minor,
        "items_minor": t.items_minor,
        "refunds_minor": t.refunds_minor,
        "sessions": t.sessions,
    })
}

fn item_json(l: &Line) -> serde_json::Value {
    serde_json::json!({
        "kind": l.kind,
        "session_id": l.session_id,
        "service": l.service,
        "appserver": l.appserver,
        "at_ms": l.at_ms,
        "item_id": l.item_id,
        "item_name": l.item_name,
        "quantity": l.quantity,
        "unit_price_minor": l.unit_price_minor,
        "amount_minor": l.amount_minor,
        "currency": l.currency,
    })
}

/// The settlement in `format`.
pub fn render_settlement(
    appserver: &str,
    fee_bp: i64,
    sessions: &[Cdr],
    charges: &[ChargeRow],
    from_ms: Option<i64>,
    to_ms: Option<i64>,
    format: Format,
) -> anyhow::Result<String> {
    let (lines, totals) = report::lines(sessions, charges);
    let settled = report::settle(totals, fee_bp);
    Ok(match format {
        Format::Json => {
            let totals: Vec<serde_json::Value> = settled
                .iter()
                .map(|s| {
                    let mut v = total_json(&s.total);
                    v["gross_minor"] = s.total.total_minor.into();
                    v["fee_minor"] = s.fee_minor.into();
                    v["net_minor"] = s.net_minor.into();
                    v
                })
                .collect();
            let lines: Vec<serde_json::Value> = lines.iter().map(item_json).collect();
            let mut s = serde_json::to_string(&serde_json::json!({
                "appserver": appserver,
                "fee_basis_points": fee_bp,
                "from_ms": from_ms,
                "to_ms": to_ms,
                "lines": lines,
                "totals": totals,
            }))?;
            s.push('\n');
            s
        }
        Format::Csv => {
            let mut out = String::from(
                "currency,sessions,time_minor,items_minor,refunds_minor,gross_minor,fee_basis_points,fee_minor,net_minor\r\n",
            );
            for st in &settled {
                let t = &st.total;
                out.push_str(&csv_line(&[
                    t.currency.clone(),
                    t.sessions.to_string(),
                    t.time_minor.to_string(),
                    t.items_minor.to_string(),
                    t.refunds_minor.to_string(),
                    t.total_minor.to_string(),
                    fee_bp.to_string(),
                    st.fee_minor.to_string(),
                    st.net_minor.to_string(),
                ]));
            }
            out
        }
        Format::Table => {
            let mut out = format!(
                "Settlement for {appserver} ({}), operator's fee {}\n",
                period(from_ms, to_ms),
                super::catalog::format_fee(fee_bp)
            );
            if settled.is_empty() {
                out.push_str("Nothing earned\n");
            }
            let rows: Vec<Vec<String>> = settled
                .iter()
                .map(|st| {
                    let t = &st.total;
                    vec![
                        t.currency.clone(),
                        t.sessions.to_string(),
                        format_money(t.time_minor, &t.currency),
                        format_money(t.items_minor, &t.currency),
                        format_money(-t.refunds_minor, &t.currency),
                        format_money(t.total_minor, &t.currency),
                        format_money(-st.fee_minor, &t.currency),
                        format_money(st.net_minor, &t.currency),
                    ]
                })
                .collect();
            if !rows.is_empty() {
                let columns = [
                    fixed("CURRENCY"),
                    fixed("SESSIONS"),
                    fixed("TIME"),
                    fixed("ITEMS"),
                    fixed("REFUNDS"),
                    fixed("GROSS"),
                    fixed("FEE"),
                    fixed("NET"),
                ];
                out.push_str(&listing::table(&columns, &rows, None));
            }
            out
        }
    })
}

pub fn render(
    user: &str,
    sessions: &[Cdr],
    charges: &[ChargeRow],
    from_ms: Option<i64>,
    to_ms: Option<i64>,
    format: Format,
) -> anyhow::Result<String> {
    let (lines, totals) = report::lines(sessions, charges);
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
            let totals: Vec<serde_json::Value> = totals.iter().map(total_json).collect();
            let items: Vec<serde_json::Value> = lines
                .iter()
                .filter(|l| l.kind != "time")
                .map(item_json)
                .collect();
            let mut s = serde_json::to_string(&serde_json::json!({
                "user": user,
                "from_ms": from_ms,
                "to_ms": to_ms,
                "sessions": list,
                "items": items,
                "totals": totals,
            }))?;
            s.push('\n');
            s
        }
        Format::Csv => {
            let mut out = String::from(
                "kind,id,service,server,started_at,ended_at,duration_ms,billed_secs,charge_minor,currency,reason,item_id,item_name,quantity,unit_price_minor\r\n",
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
                    String::new(),
                    String::new(),
                    String::new(),
                    String::new(),
                ];
                out.push_str(&csv_line(&fields));
            }
            for l in lines.iter().filter(|l| l.kind != "time") {
                let fields = [
                    l.kind.to_string(),
                    l.session_id.clone(),
                    l.service.clone().unwrap_or_default(),
                    l.appserver.clone().unwrap_or_default(),
                    format_utc_ms(l.at_ms),
                    String::new(),
                    String::new(),
                    String::new(),
                    l.amount_minor.to_string(),
                    l.currency.clone(),
                    String::new(),
                    l.item_id.clone().unwrap_or_default(),
                    l.item_name.clone().unwrap_or_default(),
                    l.quantity.to_string(),
                    l.unit_price_minor.to_string(),
                ];
                out.push_str(&csv_line(&fields));
            }
            for t in &totals {
                let mut fields = vec![String::new(); 15];
                fields[0] = "total".into();
                fields[8] = t.total_minor.to_string();
                fields[9] = t.currency.clone();
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
            let mut out = format!("Statement for {user} ({})\n", period(from_ms, to_ms));
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
            out.push_str(&items_table(&lines));
            if totals.is_empty() {
                out.push_str("Total: nothing charged\n");
            }
            for t in &totals {
                let cur = &t.currency;
                out.push_str(&format!(
                    "Total {cur}: {} (time {}, items {}, refunds {}; {} session{})\n",
                    format_money(t.total_minor, cur),
                    format_money(t.time_minor, cur),
                    format_money(t.items_minor, cur),
                    format_money(-t.refunds_minor, cur),
                    t.sessions,
                    if t.sessions == 1 { "" } else { "s" }
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
}
