//! Command line of `client-agent`.

use clap::{Parser, Subcommand};
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(
    name = "client-agent",
    version,
    about = "SIP client of sip-relay: register and place calls through the relay"
)]
pub struct Cli {
    /// The relay's SIP address, HOST:PORT (an IP address; names are not resolved).
    #[arg(long, env = "CLIENT_RELAY")]
    pub relay: String,
    /// Your user name at the relay.
    #[arg(long, env = "CLIENT_USER")]
    pub user: String,
    /// Your password.
    #[arg(long, env = "CLIENT_PASSWORD", hide_env_values = true)]
    pub password: String,
    /// The SIP domain (the relay's realm); defaults to the relay's address.
    #[arg(long)]
    pub domain: Option<String>,
    /// Transport to the relay.
    #[arg(long, value_parser = ["udp", "tcp"], default_value = "udp")]
    pub transport: String,
    /// Print one JSON object a line for each event.
    #[arg(long)]
    pub json: bool,
    /// Local SIP address to bind (default: an ephemeral port on the address that reaches the relay).
    #[arg(long)]
    pub bind: Option<std::net::SocketAddr>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Register with the relay, stay registered (refreshing) until --for elapses or Ctrl-C, then unregister.
    Register {
        /// Registration lifetime to ask for, in seconds.
        #[arg(long, default_value_t = 3600)]
        expires: u32,
        /// How long to stay registered (e.g. 30s, 5m); without it, until Ctrl-C. `0` registers once and exits, keeping the binding.
        #[arg(long = "for", value_parser = parse_duration)]
        duration: Option<Duration>,
        /// Answer incoming calls: `accept`, `busy` (486) or `ignore`.
        #[arg(long, value_parser = ["accept", "busy", "ignore"], default_value = "accept")]
        answer: String,
    },
    /// Call another user through the relay; hang up after --for or on Ctrl-C.
    Call {
        /// Who to call: a user name (`bob`) or a SIP URI (`sip:bob@example.com`).
        target: String,
        /// How long to stay in the call once established (e.g. 10s, 1m, 500ms); without it, until Ctrl-C or the other side hangs up.
        #[arg(long = "for", value_parser = parse_duration)]
        duration: Option<Duration>,
        /// Give up ringing after this long (sends CANCEL).
        #[arg(long, value_parser = parse_duration, default_value = "60s")]
        ring_timeout: Duration,
    },
}

impl Cli {
    /// Parses arguments (the first is the program name), for programs that run the agent in-process.
    pub fn try_parse_from_args(args: &[&str]) -> anyhow::Result<Cli> {
        Ok(<Cli as Parser>::try_parse_from(args)?)
    }
}

/// `500ms`, `10s`, `2m`, `1h`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("not a duration: {s:?} (try 30s, 5m, 500ms)"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        _ => {
            return Err(format!(
                "unknown unit {unit:?} in {s:?} (use ms, s, m or h)"
            ));
        }
    };
    if !(0.0..=1e9).contains(&secs) {
        return Err(format!("duration out of range: {s:?}"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::parse_duration;
    use std::time::Duration;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert!(
            parse_duration("ten")
                .unwrap_err()
                .contains("not a duration")
        );
        assert!(parse_duration("5d").unwrap_err().contains("unknown unit"));
    }
}
