//! # metrics: what the relay counts, in Prometheus' text format
//!
//! One process-wide set of counters (`prometheus-client`), updated where things happen (the
//! dispatcher, the sends, the registrar, the session table, the record writer, the charge
//! ledger) and read by `GET /metrics` on `--http` ([`crate::http`]). Gauges of what is open
//! now (transactions, dialogs, sessions, bindings, TCP connections, the record queue) are taken
//! from the relay's tables at each scrape. Names and labels follow Prometheus' conventions: a
//! `siprelay_` prefix, base units (seconds), `_total` counters, and labels of few values only
//! (methods, status classes, reasons): never a user, a session or an address. The list, with
//! each metric's meaning, is `docs/metrics.md`.
//!
//! **Invariant:** counting never blocks and never fails: a counter is an atomic.

use std::sync::LazyLock;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use proto::sip::message::{Message, Method};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabels {
    pub method: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResponseLabels {
    pub method: &'static str,
    /// `1xx` … `6xx`.
    pub class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabels {
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ChangeLabels {
    pub change: &'static str,
}

/// Every metric of the relay.
pub struct Metrics {
    pub requests_received: Family<MethodLabels, Counter>,
    pub requests_sent: Family<MethodLabels, Counter>,
    pub responses_received: Family<ResponseLabels, Counter>,
    pub responses_sent: Family<ResponseLabels, Counter>,
    pub registrations: Family<ChangeLabels, Counter>,
    pub sessions_started: Counter,
    pub sessions_ended: Family<ReasonLabels, Counter>,
    pub attempts_failed: Family<StatusLabels, Counter>,
    pub charges: Family<OutcomeLabels, Counter>,
    pub store_write_seconds: Histogram,
    pub flood_dropped: Counter,
    // Taken from the relay's tables at each scrape.
    pub transactions: Gauge,
    pub dialogs: Gauge,
    pub sessions_open: Gauge,
    pub bindings: Gauge,
    pub store_queue: Gauge,
    pub tcp_connections: Gauge,
    pub watches: Gauge,
    registry: Registry,
}

/// The relay's metrics.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::with_prefix("siprelay");
        let requests_received = Family::<MethodLabels, Counter>::default();
        registry.register(
            "sip_requests_received",
            "SIP requests received, by method (retransmissions included)",
            requests_received.clone(),
        );
        let requests_sent = Family::<MethodLabels, Counter>::default();
        registry.register(
            "sip_requests_sent",
            "SIP requests sent (relayed or the relay's own), by method",
            requests_sent.clone(),
        );
        let responses_received = Family::<ResponseLabels, Counter>::default();
        registry.register(
            "sip_responses_received",
            "SIP responses received, by the method they answer and status class",
            responses_received.clone(),
        );
        let responses_sent = Family::<ResponseLabels, Counter>::default();
        registry.register(
            "sip_responses_sent",
            "SIP responses sent (relayed or the relay's own), by the method they answer and status class",
            responses_sent.clone(),
        );
        let registrations = Family::<ChangeLabels, Counter>::default();
        registry.register(
            "registrations",
            "Accepted REGISTER requests, by what they did (registered, unregistered)",
            registrations.clone(),
        );
        let sessions_started = Counter::default();
        registry.register(
            "sessions_started",
            "Sessions established (calls and service sessions)",
            sessions_started.clone(),
        );
        let sessions_ended = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "sessions_ended",
            "Sessions ended, by reason (bye, caller-gone, max-duration, transferred, ...)",
            sessions_ended.clone(),
        );
        let attempts_failed = Family::<StatusLabels, Counter>::default();
        registry.register(
            "attempts_failed",
            "New INVITEs that made no session, by the final status the caller got",
            attempts_failed.clone(),
        );
        let charges = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "charges",
            "Application charges answered, by outcome (recorded, duplicate, conflict, invalid, not_found, forbidden, refused)",
            charges.clone(),
        );
        let store_write_seconds = Histogram::new([
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        ]);
        registry.register_with_unit(
            "store_write",
            "Time one commit of call records takes",
            Unit::Seconds,
            store_write_seconds.clone(),
        );
        let flood_dropped = Counter::default();
        registry.register(
            "flood_dropped",
            "Messages dropped because their source was over its rate (source_rate_per_sec)",
            flood_dropped.clone(),
        );
        let transactions = Gauge::default();
        registry.register(
            "transactions_open",
            "Server transactions in progress",
            transactions.clone(),
        );
        let dialogs = Gauge::default();
        registry.register(
            "dialogs_open",
            "Dialogs (sessions answered, established or ending) the relay keeps",
            dialogs.clone(),
        );
        let sessions_open = Gauge::default();
        registry.register(
            "sessions_open",
            "Sessions established now (calls and service sessions) this relay carries",
            sessions_open.clone(),
        );
        let bindings = Gauge::default();
        registry.register(
            "bindings",
            "Registered contacts now (users' devices and application servers' services), in the database",
            bindings.clone(),
        );
        let store_queue = Gauge::default();
        registry.register(
            "store_queue_depth",
            "Call-record changes waiting for the record writer",
            store_queue.clone(),
        );
        let tcp_connections = Gauge::default();
        registry.register(
            "tcp_connections",
            "TCP connections open now",
            tcp_connections.clone(),
        );
        let watches = Gauge::default();
        registry.register(
            "watches",
            "Auto-redial watches this relay keeps",
            watches.clone(),
        );
        Metrics {
            requests_received,
            requests_sent,
            responses_received,
            responses_sent,
            registrations,
            sessions_started,
            sessions_ended,
            attempts_failed,
            charges,
            store_write_seconds,
            flood_dropped,
            transactions,
            dialogs,
            sessions_open,
            bindings,
            store_queue,
            tcp_connections,
            watches,
            registry,
        }
    }

    /// The text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// A message the relay received.
    pub fn received(&self, msg: &Message) {
        match msg {
            Message::Request(r) => {
                self.requests_received
                    .get_or_create(&MethodLabels {
                        method: method_label(&r.method),
                    })
                    .inc();
            }
            Message::Response(r) => {
                self.responses_received
                    .get_or_create(&response_labels(r))
                    .inc();
            }
        }
    }

    /// A message the relay sent.
    pub fn sent(&self, msg: &Message) {
        match msg {
            Message::Request(r) => {
                self.requests_sent
                    .get_or_create(&MethodLabels {
                        method: method_label(&r.method),
                    })
                    .inc();
            }
            Message::Response(r) => {
                self.responses_sent.get_or_create(&response_labels(r)).inc();
            }
        }
    }

    /// A session ended with `reason` (a record's reason: a word of the relay's own).
    pub fn ended(&self, reason: &str) {
        self.sessions_ended
            .get_or_create(&ReasonLabels {
                reason: bounded(reason),
            })
            .inc();
    }

    /// An attempt failed with `status`.
    pub fn failed(&self, status: u16) {
        self.attempts_failed
            .get_or_create(&StatusLabels {
                status: status.to_string(),
            })
            .inc();
    }

    /// A charge was answered.
    pub fn charge(&self, outcome: proto::charge::Outcome) {
        use proto::charge::Outcome;
        let outcome = match outcome {
            Outcome::Recorded => "recorded",
            Outcome::Duplicate => "duplicate",
            Outcome::Conflict => "conflict",
            Outcome::Invalid => "invalid",
            Outcome::NotFound => "not_found",
            Outcome::Forbidden => "forbidden",
            Outcome::Refused => "refused",
        };
        self.charges.get_or_create(&OutcomeLabels { outcome }).inc();
    }

    /// A REGISTER added or refreshed (`true`) or removed (`false`) bindings.
    pub fn registration(&self, added: bool) {
        let change = if added { "registered" } else { "unregistered" };
        self.registrations
            .get_or_create(&ChangeLabels { change })
            .inc();
    }
}

/// A method's name as a label (the relay knows fourteen methods: a peer cannot make new
/// series).
fn method_label(m: &Method) -> &'static str {
    m.as_str()
}

fn response_labels(r: &proto::sip::message::Response) -> ResponseLabels {
    let method = r.cseq().map(|c| method_label(&c.method)).unwrap_or("OTHER");
    let class = match r.status / 100 {
        1 => "1xx",
        2 => "2xx",
        3 => "3xx",
        4 => "4xx",
        5 => "5xx",
        _ => "6xx",
    };
    ResponseLabels { method, class }
}

/// A reason as a label: lower-case letters and `-` only, at most 32 bytes, else `other`.
fn bounded(reason: &str) -> String {
    if !reason.is_empty()
        && reason.len() <= 32
        && reason.bytes().all(|b| b.is_ascii_lowercase() || b == b'-')
    {
        reason.to_string()
    } else {
        "other".to_string()
    }
}
