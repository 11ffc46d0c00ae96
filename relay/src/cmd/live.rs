//! `relay registrations` and `relay sessions`: what is registered and what is running now, read
//! from the store (so beside a running relay, and across every relay on one PostgreSQL).
use serde_json::Value;

use super::listing::{
    self, Column, Fields, Format, dash, fixed, flex, iso, opt, short_duration, short_time,
};
use crate::store::{Binding, Cdr, Store};

/// Options of `relay registrations`.
#[derive(Debug, clap::Args)]
pub struct RegistrationsArgs {
    /// Only this user's (or service's) registrations.
    #[arg(long, value_name = "NAME")]
    pub user: Option<String>,
    /// Output format: `table` (80 columns unless --wide), `json` or `csv` (the same fields:
    /// aor, kind, server, contact, transport, source, expires_at, expires_at_ms,
    /// expires_in_secs, user_agent, registered_at_ms).
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
    /// Table: every column, whole, however wide.
    #[arg(long)]
    pub wide: bool,
}

/// Options of `relay sessions`.
#[derive(Debug, clap::Args)]
pub struct SessionsArgs {
    /// Output format: `table` (80 columns unless --wide), `json` or `csv` (the same fields:
    /// id, user, callee, service, server, state, started_at, started_at_ms, duration_ms,
    /// node, call_id, resumed_at_ms).
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
    /// Table: every column, whole, however wide.
    #[arg(long)]
    pub wide: bool,
}

/// Prints the current (unexpired) registrations.
pub async fn registrations(store: &Store, args: RegistrationsArgs, now: i64) -> anyhow::Result<()> {
    let bindings = match &args.user {
        Some(user) => store.bindings(user, now).await?,
        None => store.all_bindings(now).await?,
    };
    print!(
        "{}",
        render_registrations(&bindings, now, args.format, args.wide)
    );
    Ok(())
}

/// Prints the sessions in progress.
pub async fn sessions(store: &Store, args: SessionsArgs, now: i64) -> anyhow::Result<()> {
    let live = store.live_sessions().await?;
    print!("{}", render_sessions(&live, now, args.format, args.wide));
    Ok(())
}

/// The fields of a registration in `json` and `csv`, in order.
pub const REGISTRATION_FIELDS: [&str; 11] = [
    "aor",
    "kind",
    "server",
    "contact",
    "transport",
    "source",
    "expires_at",
    "expires_at_ms",
    "expires_in_secs",
    "user_agent",
    "registered_at_ms",
];

/// `udp:IP:PORT` split into the transport and the address.
fn split_source(source: &str) -> (String, String) {
    match source.split_once(':') {
        Some((t, addr)) => (t.to_owned(), addr.to_owned()),
        None => (String::new(), source.to_owned()),
    }
}

/// A service's binding is made by an application-server account other than the AOR.
fn server_of(b: &Binding) -> Option<&str> {
    b.account.as_deref().filter(|a| *a != b.aor)
}

fn registration_fields(b: &Binding, now: i64) -> Fields {
    let (transport, source) = split_source(&b.source);
    let values = [
        Value::from(b.aor.clone()),
        Value::from(if server_of(b).is_some() {
            "service"
        } else {
            "user"
        }),
        opt(server_of(b).map(str::to_owned)),
        Value::from(b.contact.clone()),
        Value::from(transport),
        Value::from(source),
        iso(Some(b.expires_at_ms)),
        Value::from(b.expires_at_ms),
        Value::from((b.expires_at_ms - now).max(0) / 1000),
        opt(b.user_agent.clone()),
        Value::from(b.updated_at_ms),
    ];
    REGISTRATION_FIELDS.into_iter().zip(values).collect()
}

/// Renders registrations in the given format (ending with a newline).
pub fn render_registrations(bindings: &[Binding], now: i64, format: Format, wide: bool) -> String {
    let items = bindings.iter().map(|b| registration_fields(b, now));
    listing::render(format, &REGISTRATION_FIELDS, items, || {
        let columns: [Column; 7] = [
            flex("USER"),
            flex("SERVER"),
            flex("CONTACT"),
            fixed("VIA"),
            flex("SOURCE"),
            fixed("EXPIRES"),
            flex("USER-AGENT"),
        ];
        let rows: Vec<Vec<String>> = bindings
            .iter()
            .map(|b| {
                let (transport, source) = split_source(&b.source);
                vec![
                    b.aor.clone(),
                    dash(server_of(b).unwrap_or_default()),
                    b.contact.clone(),
                    transport,
                    source,
                    short_duration((b.expires_at_ms - now).max(0) / 1000 * 1000),
                    dash(b.user_agent.clone().unwrap_or_default()),
                ]
            })
            .collect();
        listing::table(&columns, &rows, (!wide).then_some(listing::TERMINAL_WIDTH))
    })
}

/// The fields of a live session in `json` and `csv`, in order.
pub const SESSION_FIELDS: [&str; 12] = [
    "id",
    "user",
    "callee",
    "service",
    "server",
    "state",
    "started_at",
    "started_at_ms",
    "duration_ms",
    "node",
    "call_id",
    "resumed_at_ms",
];

/// How long a session has run at `now` (0 before its ACK).
fn running_ms(c: &Cdr, now: i64) -> i64 {
    c.started_at_ms.map_or(0, |s| (now - s).max(0))
}

fn session_fields(c: &Cdr, now: i64) -> Fields {
    let values = [
        Value::from(c.id.clone()),
        Value::from(c.caller.clone()),
        Value::from(c.callee.clone()),
        opt(c.service.clone()),
        opt(c.server.clone()),
        Value::from(c.state.as_str()),
        iso(c.started_at_ms),
        opt(c.started_at_ms),
        Value::from(running_ms(c, now)),
        opt(c.owner.clone()),
        Value::from(c.call_id.clone()),
        opt(c.resumed_at_ms),
    ];
    SESSION_FIELDS.into_iter().zip(values).collect()
}

/// Renders live sessions in the given format (ending with a newline).
pub fn render_sessions(live: &[Cdr], now: i64, format: Format, wide: bool) -> String {
    let items = live.iter().map(|c| session_fields(c, now));
    listing::render(format, &SESSION_FIELDS, items, || {
        let columns: [Column; 7] = [
            fixed("ID"),
            flex("USER"),
            flex("CALLEE"),
            flex("SERVER"),
            fixed("STARTED"),
            fixed("DURATION"),
            flex("NODE"),
        ];
        let rows: Vec<Vec<String>> = live
            .iter()
            .map(|c| {
                vec![
                    if wide {
                        c.id.clone()
                    } else {
                        c.id.chars().take(8).collect()
                    },
                    c.caller.clone(),
                    c.callee.clone(),
                    dash(c.server.clone().unwrap_or_default()),
                    c.started_at_ms
                        .map(short_time)
                        .unwrap_or_else(|| "-".into()),
                    short_duration(running_ms(c, now)),
                    dash(c.owner.clone().unwrap_or_default()),
                ]
            })
            .collect();
        listing::table(&columns, &rows, (!wide).then_some(listing::TERMINAL_WIDTH))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_795_364_726_123;

    fn binding(aor: &str, account: Option<&str>) -> Binding {
        Binding {
            aor: aor.into(),
            contact: format!("sip:{aor}@192.0.2.7:5070;transport=tcp"),
            instance: None,
            expires_at_ms: NOW + 3_599_500,
            q: None,
            call_id: "c".into(),
            cseq: 1,
            source: "tcp:192.0.2.7:40211".into(),
            updated_at_ms: NOW - 500,
            account: account.map(str::to_owned),
            user_agent: Some("baresip v1.0.0 (x86_64/linux)".into()),
            node: None,
        }
    }

    #[test]
    fn registrations_name_user_or_service_source_and_expiry() {
        let list = [binding("alice", None), binding("wine", Some("vendor-a"))];
        let json = render_registrations(&list, NOW, Format::Json, false);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v[0]["kind"], "user");
        assert_eq!(v[0]["server"], serde_json::Value::Null);
        assert_eq!(v[1]["kind"], "service");
        assert_eq!(v[1]["server"], "vendor-a");
        assert_eq!(v[1]["transport"], "tcp");
        assert_eq!(v[1]["source"], "192.0.2.7:40211");
        assert_eq!(v[1]["expires_in_secs"], 3599);
        assert_eq!(v[1]["user_agent"], "baresip v1.0.0 (x86_64/linux)");
        let csv = render_registrations(&list, NOW, Format::Csv, false);
        assert_eq!(
            csv.lines().next().unwrap().split(',').collect::<Vec<_>>(),
            REGISTRATION_FIELDS
        );
        let table = render_registrations(&list, NOW, Format::Table, false);
        for line in table.lines() {
            assert!(line.chars().count() <= 80, "{line}");
        }
        assert!(
            table.contains("vendor-a") && table.contains("59m59s"),
            "{table}"
        );
    }

    #[test]
    fn sessions_say_how_long_they_have_run() {
        let c = Cdr {
            id: "0123456789abcdef".into(),
            caller: "alice".into(),
            callee: "wine".into(),
            service: Some("wine".into()),
            server: Some("vendor-a".into()),
            state: crate::store::CdrState::Established,
            created_at_ms: NOW - 65_000,
            started_at_ms: Some(NOW - 65_000),
            owner: Some("relay-1".into()),
            ..Cdr::default()
        };
        let table = render_sessions(std::slice::from_ref(&c), NOW, Format::Table, false);
        let row = table.lines().nth(1).unwrap();
        assert!(row.starts_with("01234567  alice  wine"), "{row}");
        assert!(row.contains("1m05s") && row.ends_with("relay-1"), "{row}");
        let json = render_sessions(&[c], NOW, Format::Json, false);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v[0]["duration_ms"], 65_000);
        assert_eq!(v[0]["node"], "relay-1");
    }
}
