//! The agent's metrics, in Prometheus' text format on its HTTP API (`GET /metrics`): counted
//! from the events it reports (`output::Output::emit` calls these), and the sessions open
//! taken at each scrape. Names follow Prometheus' conventions with the `siprelay_agent_` prefix; no
//! user, session or address is a label. The list is in `docs/metrics.md`.

use std::sync::LazyLock;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ByLabels {
    by: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: String,
}

pub(crate) struct Metrics {
    accepted: Counter,
    refused: Family<StatusLabels, Counter>,
    ended: Family<ByLabels, Counter>,
    charges: Family<OutcomeLabels, Counter>,
    changes: Counter,
    registration_failures: Counter,
    pub(crate) sessions_open: Gauge,
    registry: Registry,
}

pub(crate) static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::with_prefix("siprelay_agent");
        let accepted = Counter::default();
        registry.register(
            "sessions_accepted",
            "Sessions accepted (the client got the service URL)",
            accepted.clone(),
        );
        let refused = Family::<StatusLabels, Counter>::default();
        registry.register(
            "sessions_refused",
            "INVITEs refused, by the status sent (403 unverified, 404 not ours, 486 busy, 503 webhook down, ...)",
            refused.clone(),
        );
        let ended = Family::<ByLabels, Counter>::default();
        registry.register(
            "sessions_ended",
            "Sessions ended, by who ended them (client, relay, web_service, no_ack, shutdown, gone, expired)",
            ended.clone(),
        );
        let charges = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "charges",
            "Charges answered, by outcome (the relay's, or held and pending while they wait)",
            charges.clone(),
        );
        let changes = Counter::default();
        registry.register(
            "changes",
            "Service changes made (asked by the client or the web service)",
            changes.clone(),
        );
        let registration_failures = Counter::default();
        registry.register(
            "registration_failures",
            "Registration refreshes that failed (each is retried)",
            registration_failures.clone(),
        );
        let sessions_open = Gauge::default();
        registry.register("sessions_open", "Sessions live now", sessions_open.clone());
        Metrics {
            accepted,
            refused,
            ended,
            charges,
            changes,
            registration_failures,
            sessions_open,
            registry,
        }
    }

    pub(crate) fn accepted(&self) {
        self.accepted.inc();
    }

    pub(crate) fn refused(&self, status: u16) {
        self.refused
            .get_or_create(&StatusLabels {
                status: status.to_string(),
            })
            .inc();
    }

    /// `by`: one of the words `output::EndedBy` maps to.
    pub(crate) fn ended(&self, by: &'static str) {
        self.ended.get_or_create(&ByLabels { by }).inc();
    }

    /// `outcome`: the relay's word, or the agent's (`held`, `pending`); anything else is
    /// counted as `other` (a label never takes an unbounded value).
    pub(crate) fn charge(&self, outcome: &str) {
        let outcome = if !outcome.is_empty()
            && outcome.len() <= 32
            && outcome.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
        {
            outcome.to_string()
        } else {
            "other".to_string()
        };
        self.charges.get_or_create(&OutcomeLabels { outcome }).inc();
    }

    pub(crate) fn changed(&self) {
        self.changes.inc();
    }

    pub(crate) fn registration_failed(&self) {
        self.registration_failures.inc();
    }

    /// Every metric as text.
    pub(crate) fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
