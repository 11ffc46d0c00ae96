//! Service change (SPEC feature 8, the seed's Embodiment 5): a session's segments. Each change of
//! the service details that the session's server accepted closes the running segment and opens
//! another, rated by its own service's tariff; the record keeps every segment and its charge is
//! their sum. The set-up fee is due once, with the first segment: a change is not a new session.
//!
//! What is measured stays what it was: the session's billed duration runs from the ACK to the
//! end on the monotonic clock; a change splits it at the moment the relay relayed the 2xx that
//! accepted it, and the last segment takes the rest, so the segments always add up to the
//! duration.

use super::{DialogKey, ServiceInfo, Session, Sessions, elapsed_ms};
use crate::billing::{Rated, Tariff};
use proto::clock::now_ms;
use proto::log::Esc;
use proto::sync::lock;
use serde::{Deserialize, Serialize};
use std::time::Instant;

/// One stretch of a session under one service and details, as the record keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    pub service: String,
    pub details: Option<String>,
    /// UTC ms: the ACK for the first segment, the accepted change for the others.
    pub started_at_ms: i64,
    /// UTC ms; none while it runs.
    pub ended_at_ms: Option<i64>,
    pub duration_ms: i64,
    pub billed_secs: i64,
    pub charge_minor: i64,
    pub tariff: Tariff,
}

/// Why a change cannot start now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeRefused {
    /// No such dialog, or it is not a service session.
    NoSession,
    /// Not yet acknowledged, or ending.
    NotEstablished,
    /// Another change is in progress (RFC 3261 §14.2: 491).
    Pending,
}

/// Rates the segments of a session that lasted `duration_ms` and ended at `end_ms` (UTC): the
/// closed ones as they were measured, the running one (`current`, begun at `current_start_ms`)
/// the rest. Returns every segment, closed, and their sum.
pub fn rate(
    closed: &[Segment],
    current: &ServiceInfo,
    current_start_ms: i64,
    duration_ms: i64,
    end_ms: i64,
) -> (Vec<Segment>, Rated) {
    let mut out = Vec::with_capacity(closed.len() + 1);
    let mut total = Rated {
        billed_secs: 0,
        charge_minor: 0,
    };
    let mut used = 0i64;
    for s in closed {
        used = used.saturating_add(s.duration_ms);
        let r = rate_one(&s.tariff, s.duration_ms, out.is_empty());
        out.push(Segment {
            billed_secs: r.billed_secs,
            charge_minor: r.charge_minor,
            ..s.clone()
        });
        add(&mut total, r);
    }
    let rest = duration_ms.saturating_sub(used).max(0);
    let r = rate_one(&current.tariff, rest, out.is_empty());
    out.push(Segment {
        service: current.name.clone(),
        details: current.details.clone(),
        started_at_ms: current_start_ms,
        ended_at_ms: Some(end_ms),
        duration_ms: rest,
        billed_secs: r.billed_secs,
        charge_minor: r.charge_minor,
        tariff: current.tariff.clone(),
    });
    add(&mut total, r);
    (out, total)
}

/// One segment's time by its tariff; the set-up fee only on the first.
fn rate_one(tariff: &Tariff, duration_ms: i64, first: bool) -> Rated {
    if first {
        tariff.rate(duration_ms)
    } else {
        Tariff {
            setup_fee_minor: 0,
            ..tariff.clone()
        }
        .rate(duration_ms)
    }
}

fn add(total: &mut Rated, r: Rated) {
    total.billed_secs = total.billed_secs.saturating_add(r.billed_secs);
    total.charge_minor = total.charge_minor.saturating_add(r.charge_minor);
}

impl Session {
    /// The segments as the record shows them while the session runs (the running one open).
    fn running_segments(&self) -> Option<String> {
        let sv = self.d.service.as_ref()?;
        let mut all = self.d.segments.clone();
        all.push(Segment {
            service: sv.name.clone(),
            details: sv.details.clone(),
            started_at_ms: self.segment_start_ms(),
            ended_at_ms: None,
            duration_ms: 0,
            billed_secs: 0,
            charge_minor: 0,
            tariff: sv.tariff.clone(),
        });
        serde_json::to_string(&all).ok()
    }

    /// When the running segment began (UTC ms): the last change, else the start.
    pub(super) fn segment_start_ms(&self) -> i64 {
        self.d
            .segment_started_ms
            .or(self.cdr.started_at_ms)
            .unwrap_or(self.cdr.created_at_ms)
    }
}

impl Sessions {
    /// A request changing the service of a session is about to be relayed: the session's
    /// service and server (to search again), or why it cannot change now. Marks a change as
    /// pending until [`Sessions::change_answered`].
    pub fn begin_change(
        &self,
        key: &DialogKey,
    ) -> Result<(ServiceInfo, String, String, String), ChangeRefused> {
        let mut map = lock(&self.by_call);
        let s = map
            .get_mut(&key.call_id)
            .and_then(|l| {
                l.iter_mut()
                    .find(|s| s.matches(&key.caller_tag, &key.callee_tag))
            })
            .ok_or(ChangeRefused::NoSession)?;
        let (Some(sv), Some(server)) = (s.d.service.clone(), s.cdr.server.clone()) else {
            return Err(ChangeRefused::NoSession);
        };
        if s.started.is_none() || s.ending || s.bye_from.is_some() {
            return Err(ChangeRefused::NotEstablished);
        }
        if s.changing {
            return Err(ChangeRefused::Pending);
        }
        s.changing = true;
        Ok((sv, server, s.cdr.caller.clone(), s.cdr.id.clone()))
    }

    /// Which party of the dialog `key` sent a request with `from_tag`.
    pub fn party(&self, key: &DialogKey, from_tag: &str) -> Option<super::Party> {
        let map = lock(&self.by_call);
        map.get(&key.call_id)?
            .iter()
            .find(|s| s.matches(&key.caller_tag, &key.callee_tag))
            .map(|s| s.party_of(from_tag))
    }

    /// The final answer to a change was relayed. A 2xx closes the running segment at `now` and
    /// opens one under `service`; any other answer leaves the session as it was.
    pub fn change_answered(
        &self,
        key: &DialogKey,
        service: Option<ServiceInfo>,
        status: u16,
        now: Instant,
    ) {
        let writer = &self.writer;
        let mut map = lock(&self.by_call);
        let Some(s) = map.get_mut(&key.call_id).and_then(|l| {
            l.iter_mut()
                .find(|s| s.matches(&key.caller_tag, &key.callee_tag))
        }) else {
            return;
        };
        s.changing = false;
        let (Some(new), Some(started), Some(old)) = (service, s.started, s.d.service.clone())
        else {
            return;
        };
        if !(200..300).contains(&status) || s.cdr.state != super::CdrState::Established {
            return;
        }
        let wall = now_ms();
        let so_far: i64 = s.d.segments.iter().map(|g| g.duration_ms).sum();
        let duration = elapsed_ms(started, now).saturating_sub(so_far).max(0);
        s.d.segments.push(Segment {
            service: old.name.clone(),
            details: old.details.clone(),
            started_at_ms: s.segment_start_ms(),
            ended_at_ms: Some(wall),
            duration_ms: duration,
            billed_secs: 0,
            charge_minor: 0,
            tariff: old.tariff.clone(),
        });
        s.d.segment_started_ms = Some(wall);
        tracing::info!(
            session = %s.cdr.id,
            call_id = %Esc(&s.cdr.call_id),
            from_service = %old.name,
            from_details = %Esc(old.details.as_deref().unwrap_or("-")),
            service = %new.name,
            details = %Esc(new.details.as_deref().unwrap_or("-")),
            "Service changed"
        );
        // A new maximum duration counts from the session's start.
        s.deadline = super::max_deadline(started, Some(&new));
        s.cdr.service = Some(new.name.clone());
        s.cdr.details = new.details.clone();
        s.cdr.currency = Some(new.tariff.currency.clone());
        s.d.service = Some(new);
        s.cdr.segments = s.running_segments();
        s.cdr.dialog = serde_json::to_string(&s.d).ok();
        writer.save(s.cdr.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sv(name: &str, per_minute: i64, setup: i64) -> ServiceInfo {
        ServiceInfo {
            name: name.into(),
            tariff: Tariff {
                per_minute_minor: per_minute,
                setup_fee_minor: setup,
                increment_secs: 1,
                currency: "EUR".into(),
            },
            max_duration_secs: None,
            details: Some(format!("some {name}")),
        }
    }

    #[test]
    fn each_segment_is_rated_by_its_own_tariff_and_the_fee_is_due_once() {
        let wine = sv("wine", 60, 50);
        let beer = sv("beer", 120, 70);
        let closed = vec![Segment {
            service: "wine".into(),
            details: wine.details.clone(),
            started_at_ms: 1_000,
            ended_at_ms: Some(31_000),
            duration_ms: 30_000,
            billed_secs: 0,
            charge_minor: 0,
            tariff: wine.tariff.clone(),
        }];
        let (all, total) = rate(&closed, &beer, 31_000, 90_000, 91_000);
        assert_eq!(all.len(), 2);
        // 30 s of wine at 0.60/min + the set-up fee 0.50; 60 s of beer at 1.20/min, no fee.
        assert_eq!(all[0].charge_minor, 30 + 50);
        assert_eq!(all[1].charge_minor, 120);
        assert_eq!(all[1].duration_ms, 60_000);
        assert_eq!(all[1].ended_at_ms, Some(91_000));
        assert_eq!(total.charge_minor, 30 + 50 + 120);
        assert_eq!(total.billed_secs, 90);
        assert_eq!(
            all.iter().map(|s| s.duration_ms).sum::<i64>(),
            90_000,
            "the segments add up to the duration"
        );
    }

    #[test]
    fn one_segment_is_the_whole_session() {
        let wine = sv("wine", 60, 50);
        let (all, total) = rate(&[], &wine, 1_000, 42_000, 43_000);
        assert_eq!(all.len(), 1);
        assert_eq!(total, wine.tariff.rate(42_000));
    }

    #[test]
    fn a_last_segment_never_goes_negative() {
        let wine = sv("wine", 60, 0);
        let closed = vec![Segment {
            service: "wine".into(),
            details: None,
            started_at_ms: 0,
            ended_at_ms: Some(10_000),
            duration_ms: 10_000,
            billed_secs: 0,
            charge_minor: 0,
            tariff: wine.tariff.clone(),
        }];
        // A maximum duration cut the session before the change's moment.
        let (all, _) = rate(&closed, &wine, 10_000, 8_000, 8_000);
        assert_eq!(all[1].duration_ms, 0);
    }
}
