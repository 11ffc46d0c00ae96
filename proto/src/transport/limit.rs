//! Per-source limits: trusted networks (`Cidr`), a token bucket per source address
//! ([`SourceLimiter`]), and a per-source gate for log lines ([`LogGate`]).
//!
//! No I/O and no clock reads: the caller passes `now`. Every table here is bounded; a table that
//! is full first forgets the sources it would treat as new anyway (a full bucket, a quiet gate),
//! then the oldest.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::time::{Duration, Instant};

/// A network in CIDR notation (`10.0.0.0/8`, `2001:db8::/32`); a bare address is a single host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    net: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Whether `ip` is inside this network (an IPv4-mapped IPv6 address counts as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        match (self.net, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }

    /// Parses a comma-separated list (`--trusted 10.0.0.0/8,192.0.2.7`); blanks are skipped.
    pub fn parse_list(text: &str) -> Result<Vec<Cidr>, String> {
        text.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::parse)
            .collect()
    }
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Cidr, String> {
        let s = s.trim();
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let net: IpAddr = addr
            .parse()
            .map_err(|_| format!("{s:?} is not a network: use ADDRESS or ADDRESS/PREFIX"))?;
        let net = canonical(net);
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: the prefix length must be 0 to {max}"))?,
        };
        Ok(Cidr { net, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.net, self.prefix)
    }
}

impl<'de> serde::Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Cidr, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Settings of a [`SourceLimiter`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceLimits {
    /// Messages a source may send per second, sustained. 0 turns the limit off.
    pub rate_per_sec: u32,
    /// Messages a source may send at once beyond the rate (the bucket's size).
    pub burst: u32,
    /// Sources exempt from the limit.
    pub trusted: Vec<Cidr>,
    /// Most sources tracked at once.
    pub max_sources: usize,
    /// At most one log line per source this often while it is over its limit.
    pub log_interval: Duration,
}

impl Default for SourceLimits {
    fn default() -> Self {
        SourceLimits {
            rate_per_sec: 1000,
            burst: 2000,
            trusted: Vec::new(),
            max_sources: 65_536,
            log_interval: Duration::from_secs(10),
        }
    }
}

/// What the limiter says of one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Within the limit (or trusted): handle it.
    Pass,
    /// Over the limit: drop it. `log` holds the number dropped since the last line when a line
    /// is due now (at most one per `log_interval` per source).
    Drop { log: Option<u64> },
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Tokens in thousandths, so fractional refills are not lost.
    milli: u64,
    at: Instant,
    dropped: u64,
    logged_at: Option<Instant>,
}

/// A token bucket per source address (per IP, whatever the port).
#[derive(Debug)]
pub struct SourceLimiter {
    limits: SourceLimits,
    buckets: HashMap<IpAddr, Bucket>,
}

impl SourceLimiter {
    pub fn new(limits: SourceLimits) -> SourceLimiter {
        SourceLimiter {
            limits,
            buckets: HashMap::new(),
        }
    }

    /// Whether `ip` is in a trusted network.
    pub fn is_trusted(&self, ip: IpAddr) -> bool {
        self.limits.trusted.iter().any(|c| c.contains(ip))
    }

    /// Number of sources tracked.
    pub fn tracked(&self) -> usize {
        self.buckets.len()
    }

    fn capacity_milli(&self) -> u64 {
        u64::from(self.limits.burst.max(1)) * 1000
    }

    /// Takes a token for one message from `ip` at `now`.
    pub fn check(&mut self, ip: IpAddr, now: Instant) -> Verdict {
        if self.limits.rate_per_sec == 0 || self.is_trusted(ip) {
            return Verdict::Pass;
        }
        let cap = self.capacity_milli();
        let rate = u64::from(self.limits.rate_per_sec);
        if !self.buckets.contains_key(&ip) && self.buckets.len() >= self.limits.max_sources {
            self.make_room(now);
        }
        let bucket = self.buckets.entry(ip).or_insert(Bucket {
            milli: cap,
            at: now,
            dropped: 0,
            logged_at: None,
        });
        // Tokens per second × elapsed ms = thousandths of a token.
        let elapsed_ms =
            u64::try_from(now.saturating_duration_since(bucket.at).as_millis()).unwrap_or(u64::MAX);
        if elapsed_ms > 0 {
            bucket.milli = bucket
                .milli
                .saturating_add(elapsed_ms.saturating_mul(rate))
                .min(cap);
            bucket.at = now;
        }
        if bucket.milli >= 1000 {
            bucket.milli -= 1000;
            return Verdict::Pass;
        }
        bucket.dropped += 1;
        let due = bucket
            .logged_at
            .is_none_or(|t| now.saturating_duration_since(t) >= self.limits.log_interval);
        if due {
            bucket.logged_at = Some(now);
            let n = bucket.dropped;
            bucket.dropped = 0;
            Verdict::Drop { log: Some(n) }
        } else {
            Verdict::Drop { log: None }
        }
    }

    /// Forgets sources whose bucket has refilled (they would start full anyway); when none has,
    /// the least recently seen half.
    fn make_room(&mut self, now: Instant) {
        let cap = self.capacity_milli();
        let rate = u64::from(self.limits.rate_per_sec.max(1));
        let full_after_ms = cap / rate + 1;
        self.buckets.retain(|_, b| {
            let ms =
                u64::try_from(now.saturating_duration_since(b.at).as_millis()).unwrap_or(u64::MAX);
            ms < full_after_ms
        });
        if self.buckets.len() >= self.limits.max_sources {
            let mut ages: Vec<Instant> = self.buckets.values().map(|b| b.at).collect();
            ages.sort_unstable();
            let cut = ages[ages.len() / 2];
            self.buckets.retain(|_, b| b.at > cut);
        }
    }
}

/// At most `burst` log lines per source per `interval`; then one line saying how many were
/// held back. For log lines caused by what a source sends (failed authentication, unreadable
/// messages), so that no source can fill the log.
#[derive(Debug)]
pub struct LogGate {
    burst: u32,
    interval: Duration,
    max_sources: usize,
    sources: HashMap<IpAddr, GateState>,
}

#[derive(Debug, Clone, Copy)]
struct GateState {
    window: Instant,
    lines: u32,
    held: u64,
}

/// Whether to write a log line now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// Write it; `held` lines of this source were held back since the last one written.
    Write { held: u64 },
    /// Hold it back.
    Hold,
}

impl LogGate {
    pub fn new(burst: u32, interval: Duration, max_sources: usize) -> LogGate {
        LogGate {
            burst: burst.max(1),
            interval,
            max_sources: max_sources.max(1),
            sources: HashMap::new(),
        }
    }

    pub fn check(&mut self, ip: IpAddr, now: Instant) -> Gate {
        if !self.sources.contains_key(&ip) && self.sources.len() >= self.max_sources {
            let interval = self.interval;
            self.sources
                .retain(|_, s| now.saturating_duration_since(s.window) < interval);
            if self.sources.len() >= self.max_sources {
                self.sources.clear();
            }
        }
        let s = self.sources.entry(ip).or_insert(GateState {
            window: now,
            lines: 0,
            held: 0,
        });
        if now.saturating_duration_since(s.window) >= self.interval {
            s.window = now;
            s.lines = 0;
        }
        if s.lines < self.burst {
            s.lines += 1;
            let held = std::mem::take(&mut s.held);
            Gate::Write { held }
        } else {
            s.held += 1;
            Gate::Hold
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn cidrs_parse_and_match() {
        let c: Cidr = "10.1.0.0/16".parse().unwrap();
        assert!(c.contains(ip("10.1.200.3")));
        assert!(!c.contains(ip("10.2.0.1")));
        assert!(
            c.contains(ip("::ffff:10.1.0.9")),
            "IPv4-mapped counts as IPv4"
        );
        let host: Cidr = "127.0.0.2".parse().unwrap();
        assert!(host.contains(ip("127.0.0.2")));
        assert!(!host.contains(ip("127.0.0.1")));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(ip("192.0.2.1")));
        let v6: Cidr = "2001:db8::/32".parse().unwrap();
        assert!(v6.contains(ip("2001:db8:1::5")));
        assert!(!v6.contains(ip("10.0.0.1")));
        assert_eq!(
            Cidr::parse_list(" 10.0.0.0/8, ::1 ,").unwrap().len(),
            2,
            "blanks skipped"
        );
        let err = "10.0.0.0/33".parse::<Cidr>().unwrap_err();
        assert!(err.contains("0 to 32"), "{err}");
        let err = "ten".parse::<Cidr>().unwrap_err();
        assert!(err.contains("\"ten\""), "{err}");
    }

    #[test]
    fn a_bucket_passes_its_burst_then_its_rate() {
        let mut l = SourceLimiter::new(SourceLimits {
            rate_per_sec: 100,
            burst: 10,
            ..SourceLimits::default()
        });
        let t0 = Instant::now();
        let a = ip("127.0.0.2");
        let passed = (0..50).filter(|_| l.check(a, t0) == Verdict::Pass).count();
        assert_eq!(passed, 10, "the burst, then nothing at the same instant");
        // 100 a second: one token every 10 ms.
        assert_eq!(l.check(a, t0 + Duration::from_millis(10)), Verdict::Pass);
        assert!(matches!(
            l.check(a, t0 + Duration::from_millis(10)),
            Verdict::Drop { .. }
        ));
        // Another source is not affected.
        assert_eq!(l.check(ip("127.0.0.1"), t0), Verdict::Pass);
        // Over a second, about the rate.
        let mut ok = 0;
        for ms in 0..1000u64 {
            for _ in 0..5 {
                if l.check(a, t0 + Duration::from_millis(1000 + ms)) == Verdict::Pass {
                    ok += 1;
                }
            }
        }
        assert!((100..=112).contains(&ok), "{ok} passed in one second");
    }

    #[test]
    fn drops_are_logged_once_per_interval_with_their_count() {
        let mut l = SourceLimiter::new(SourceLimits {
            rate_per_sec: 1,
            burst: 1,
            log_interval: Duration::from_secs(10),
            ..SourceLimits::default()
        });
        let t0 = Instant::now();
        let a = ip("192.0.2.9");
        assert_eq!(l.check(a, t0), Verdict::Pass);
        assert_eq!(l.check(a, t0), Verdict::Drop { log: Some(1) });
        for _ in 0..99 {
            assert_eq!(l.check(a, t0), Verdict::Drop { log: None });
        }
        let later = t0 + Duration::from_secs(10);
        assert_eq!(l.check(a, later), Verdict::Pass, "a token refilled");
        assert_eq!(l.check(a, later), Verdict::Drop { log: Some(100) });
    }

    #[test]
    fn trusted_sources_and_a_zero_rate_are_never_limited() {
        let mut l = SourceLimiter::new(SourceLimits {
            rate_per_sec: 1,
            burst: 1,
            trusted: vec!["10.0.0.0/8".parse().unwrap()],
            ..SourceLimits::default()
        });
        let t0 = Instant::now();
        assert!((0..1000).all(|_| l.check(ip("10.9.9.9"), t0) == Verdict::Pass));
        assert_eq!(l.tracked(), 0, "trusted sources take no table space");
        let mut off = SourceLimiter::new(SourceLimits {
            rate_per_sec: 0,
            ..SourceLimits::default()
        });
        assert!((0..1000).all(|_| off.check(ip("192.0.2.1"), t0) == Verdict::Pass));
    }

    #[test]
    fn the_table_of_sources_is_bounded() {
        let mut l = SourceLimiter::new(SourceLimits {
            rate_per_sec: 10,
            burst: 10,
            max_sources: 100,
            ..SourceLimits::default()
        });
        let t0 = Instant::now();
        for i in 0..10_000u32 {
            let a = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            l.check(a, t0 + Duration::from_micros(u64::from(i)));
            assert!(l.tracked() <= 100, "{} tracked", l.tracked());
        }
    }

    #[test]
    fn the_log_gate_holds_lines_back_and_counts_them() {
        let mut g = LogGate::new(2, Duration::from_secs(10), 10);
        let t0 = Instant::now();
        let a = ip("192.0.2.1");
        assert_eq!(g.check(a, t0), Gate::Write { held: 0 });
        assert_eq!(g.check(a, t0), Gate::Write { held: 0 });
        assert_eq!(g.check(a, t0), Gate::Hold);
        assert_eq!(g.check(a, t0), Gate::Hold);
        assert_eq!(
            g.check(ip("192.0.2.2"), t0),
            Gate::Write { held: 0 },
            "per source"
        );
        assert_eq!(
            g.check(a, t0 + Duration::from_secs(10)),
            Gate::Write { held: 2 }
        );
        for i in 0..1000u32 {
            g.check(
                IpAddr::from(std::net::Ipv4Addr::from(i)),
                t0 + Duration::from_secs(11),
            );
            assert!(g.sources.len() <= 10);
        }
    }
}
