//! Billing control: rating a session's measured time by its service's tariff.
//!
//! Money is integer minor units of an ISO 4217 currency; nothing here is a float. The rule, one
//! rounding per step, applied in this order:
//! 1. the measured duration is rounded **up** to a whole number of billing increments
//!    (`billed_secs = ceil(duration / increment) × increment`; a zero duration bills 0 s);
//! 2. the time part is `per_minute × billed_secs / 60`, rounded **up** to the next minor unit;
//! 3. the charge is the set-up fee plus the time part. The set-up fee is due once a session is
//!    established (the ACK was relayed), whatever its length.
//!
//! This module must not touch the store or the network: the session module stores the charge
//! in the same row (and statement) as the record it belongs to.

use serde::{Deserialize, Serialize};

/// The price of a service's time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tariff {
    pub per_minute_minor: i64,
    pub setup_fee_minor: i64,
    /// Billing increment in seconds (at least 1).
    pub increment_secs: i64,
    /// ISO 4217 code.
    pub currency: String,
}

/// The rated time of one session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rated {
    pub billed_secs: i64,
    pub charge_minor: i64,
}

impl Tariff {
    /// Rates a measured duration (milliseconds) by the rule in the module documentation.
    pub fn rate(&self, duration_ms: i64) -> Rated {
        let duration_ms = i128::from(duration_ms.max(0));
        let increment_ms = i128::from(self.increment_secs.max(1)) * 1000;
        let units = (duration_ms + increment_ms - 1) / increment_ms;
        let billed_secs = units * increment_ms / 1000;
        let time_part = (i128::from(self.per_minute_minor) * billed_secs + 59).div_euclid(60);
        let charge = i128::from(self.setup_fee_minor) + time_part;
        Rated {
            billed_secs: clamp(billed_secs),
            charge_minor: clamp(charge),
        }
    }
}

fn clamp(v: i128) -> i64 {
    i64::try_from(v).unwrap_or(if v < 0 { i64::MIN } else { i64::MAX })
}

/// Whether `code` looks like an ISO 4217 code (three ASCII capitals).
pub fn is_currency_code(code: &str) -> bool {
    code.len() == 3 && code.bytes().all(|b| b.is_ascii_uppercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tariff(per_minute: i64, setup: i64, increment: i64) -> Tariff {
        Tariff {
            per_minute_minor: per_minute,
            setup_fee_minor: setup,
            increment_secs: increment,
            currency: "EUR".into(),
        }
    }

    #[test]
    fn durations_round_up_to_the_increment() {
        let t = tariff(60, 0, 10);
        assert_eq!(
            t.rate(0),
            Rated {
                billed_secs: 0,
                charge_minor: 0
            }
        );
        assert_eq!(
            t.rate(1),
            Rated {
                billed_secs: 10,
                charge_minor: 10
            }
        );
        assert_eq!(
            t.rate(10_000),
            Rated {
                billed_secs: 10,
                charge_minor: 10
            }
        );
        assert_eq!(
            t.rate(10_001),
            Rated {
                billed_secs: 20,
                charge_minor: 20
            }
        );
        // Per-minute billing: 61 s is two minutes.
        let t = tariff(100, 0, 60);
        assert_eq!(
            t.rate(61_000),
            Rated {
                billed_secs: 120,
                charge_minor: 200
            }
        );
    }

    #[test]
    fn the_setup_fee_is_added_once() {
        let t = tariff(120, 50, 1);
        assert_eq!(t.rate(0).charge_minor, 50);
        assert_eq!(t.rate(30_000).charge_minor, 50 + 60);
    }

    #[test]
    fn money_rounds_up_to_the_minor_unit() {
        // 7 minor units a minute, 1 s increments: 1 s costs 7/60, billed as 1.
        let t = tariff(7, 0, 1);
        assert_eq!(t.rate(1_000).charge_minor, 1);
        assert_eq!(t.rate(60_000).charge_minor, 7);
        assert_eq!(t.rate(61_000).charge_minor, 8);
    }

    #[test]
    fn no_overflow_on_absurd_values() {
        let t = tariff(i64::MAX, i64::MAX, 1);
        assert_eq!(t.rate(i64::MAX).charge_minor, i64::MAX);
        assert_eq!(t.rate(-5).billed_secs, 0);
    }

    #[test]
    fn currency_codes() {
        assert!(is_currency_code("EUR"));
        assert!(!is_currency_code("eur"));
        assert!(!is_currency_code("EURO"));
    }
}
