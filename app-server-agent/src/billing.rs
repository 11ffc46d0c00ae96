//! Charges from the vendor's web service to the relay, delivered exactly once.
//!
//! The web service posts charges for a session (`POST /sessions/{id}/charges`). With
//! `--billing immediate` each goes to the relay's gRPC endpoint at once; with `--billing
//! on-bye` they are held and put in the body of the agent's 200 OK for the client's BYE, and
//! go over gRPC when the session ends any other way. Every charge not yet answered by the relay
//! is kept in the charges file (owner-readable only) and sent again, with the same idempotency
//! key, with backoff, until the relay records it or refuses it with a reason (reported as an
//! event). The relay counts a key once, so sending again is always safe: a charge put in a 200
//! for BYE is confirmed over gRPC a little later, and answered as a duplicate.
//!
//! The only module of the agent that sees tonic.
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use proto::charge::{Charge, ChargeResult, Charges, Outcome};
use proto::grpc::relay_v1 as v1;
use proto::sync::lock;
use serde::{Deserialize, Serialize};
use std::sync::Mutex;
use tokio::sync::Notify;
use v1::billing_client::BillingClient;

use crate::output::{Event, Output};

/// How charges reach the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Each charge over gRPC at once.
    Immediate,
    /// Held until the session ends: in the 200 OK for the client's BYE, else over gRPC.
    OnBye,
    /// Each charge at once in an INFO within the session (over gRPC when the session is not
    /// running here or the INFO got no answer).
    Info,
}

/// A charge a held 200 for BYE carried is confirmed over gRPC this long after.
const CONFIRM_AFTER: Duration = Duration::from_secs(5);
/// The longest wait between two tries of a charge.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// How long one gRPC call may take.
const CALL_LIMIT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum State {
    /// Waiting for its session's end (on-bye).
    Held,
    /// To be sent (again) over gRPC.
    Pending,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    charge: Charge,
    state: State,
    attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    last_error: Option<String>,
    #[serde(skip)]
    next_try: Option<Instant>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct File {
    charges: Vec<Entry>,
}

/// What the agent answers for one posted charge: the relay's result, or `held` / `pending`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct Answer {
    pub(crate) idempotency_key: String,
    /// `recorded`, `duplicate`, `conflict`, `invalid`, `not_found`, `forbidden`, `refused`
    /// (the relay's), `held` (on-bye) or `pending` (the relay not reached yet; sent again).
    pub(crate) outcome: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) charge_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) amount_minor: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) message: Option<String>,
}

impl Answer {
    fn of(r: &ChargeResult) -> Answer {
        Answer {
            idempotency_key: r.idempotency_key.clone(),
            outcome: outcome_text(r.outcome).into(),
            charge_id: r.charge_id.clone(),
            amount_minor: r.amount_minor,
            message: r.message.clone(),
        }
    }

    fn waiting(c: &Charge, outcome: &str, message: Option<String>) -> Answer {
        Answer {
            idempotency_key: c.idempotency_key.clone(),
            outcome: outcome.into(),
            charge_id: None,
            amount_minor: c.unit_price_minor.checked_mul(c.quantity),
            message,
        }
    }
}

fn outcome_text(o: Outcome) -> &'static str {
    match o {
        Outcome::Recorded => "recorded",
        Outcome::Duplicate => "duplicate",
        Outcome::Conflict => "conflict",
        Outcome::Invalid => "invalid",
        Outcome::NotFound => "not_found",
        Outcome::Forbidden => "forbidden",
        Outcome::Refused => "refused",
    }
}

/// Where the relay's billing endpoint is and how to reach it.
#[derive(Debug, Clone)]
pub struct GrpcSettings {
    /// `http://HOST:PORT` or `https://HOST:PORT`.
    pub url: String,
    /// The billing token.
    pub token: String,
    /// For https: the certificate authority (PEM file) to trust instead of the system's roots.
    pub ca: Option<PathBuf>,
    /// For https to a relay asking for mutual TLS: this server's certificate chain and key (PEM
    /// files).
    pub identity: Option<(PathBuf, PathBuf)>,
}

/// The relay's billing endpoint.
#[derive(Clone)]
struct Relay {
    client: BillingClient<tonic::transport::Channel>,
    auth: tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
}

/// The charges of this agent on their way to the relay.
pub(crate) struct Billing {
    mode: Mode,
    path: PathBuf,
    relay: Option<Relay>,
    entries: Mutex<Vec<Entry>>,
    wake: Notify,
    out: Output,
}

impl std::fmt::Debug for Billing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Billing")
            .field("mode", &self.mode)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// Why a posted charge cannot be taken (before anything is kept).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Bad input: the message names the field.
    Invalid(String),
    /// The key is waiting here with a different charge.
    Conflict(String),
    /// Neither gRPC nor on-bye: charges have nowhere to go.
    NoWay(String),
}

impl Billing {
    /// Opens the charges file (created owner-readable only) and the relay's endpoint; charges
    /// left from an earlier run are sent again.
    pub(crate) fn open(
        mode: Mode,
        path: PathBuf,
        grpc: Option<GrpcSettings>,
        out: Output,
    ) -> anyhow::Result<Arc<Billing>> {
        let relay = match grpc {
            Some(GrpcSettings {
                url,
                token,
                ca,
                identity,
            }) => {
                let mut endpoint = tonic::transport::Endpoint::from_shared(url.clone())
                    .map_err(|e| anyhow::anyhow!("--grpc {url:?}: {e}"))?
                    .connect_timeout(CALL_LIMIT)
                    .timeout(CALL_LIMIT);
                if url.starts_with("https://") {
                    let tls = match &ca {
                        Some(file) => {
                            let pem = std::fs::read(file).map_err(|e| {
                                anyhow::anyhow!("--grpc-ca {}: {e}", file.display())
                            })?;
                            tonic::transport::ClientTlsConfig::new()
                                .ca_certificate(tonic::transport::Certificate::from_pem(pem))
                        }
                        None => tonic::transport::ClientTlsConfig::new().with_native_roots(),
                    };
                    let tls = match &identity {
                        Some((cert, key)) => {
                            let read = |f: &PathBuf, flag: &str| {
                                std::fs::read(f)
                                    .map_err(|e| anyhow::anyhow!("{flag} {}: {e}", f.display()))
                            };
                            tls.identity(tonic::transport::Identity::from_pem(
                                read(cert, "--grpc-cert")?,
                                read(key, "--grpc-key")?,
                            ))
                        }
                        None => tls,
                    };
                    endpoint = endpoint
                        .tls_config(tls)
                        .map_err(|e| anyhow::anyhow!("--grpc {url:?}: TLS: {e:?}"))?;
                }
                let auth = format!("Bearer {}", token.trim()).parse().map_err(|_| {
                    anyhow::anyhow!("the gRPC token holds characters a header cannot carry")
                })?;
                Some(Relay {
                    client: BillingClient::new(endpoint.connect_lazy()),
                    auth,
                })
            }
            None => None,
        };
        let mut entries = match std::fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice::<File>(&bytes)
                    .map_err(|e| anyhow::anyhow!("charges file {}: {e}", path.display()))?
                    .charges
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => anyhow::bail!("cannot read the charges file {}: {e}", path.display()),
        };
        // Sessions do not outlive the agent: what was held goes over gRPC now.
        for e in &mut entries {
            e.state = State::Pending;
        }
        if !entries.is_empty() {
            tracing::info!(
                charges = entries.len(),
                file = %path.display(),
                "Charges from an earlier run are sent to the relay again"
            );
        }
        let billing = Arc::new(Billing {
            mode,
            path,
            relay,
            entries: Mutex::new(entries),
            wake: Notify::new(),
            out,
        });
        billing.save()?;
        Ok(billing)
    }

    /// Writes the file: a new file (owner read and write only) renamed over the old one; none
    /// when nothing waits.
    fn save(&self) -> anyhow::Result<()> {
        let json = {
            let entries = lock(&self.entries);
            if entries.is_empty() {
                return match std::fs::remove_file(&self.path) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(anyhow::anyhow!(
                        "cannot remove {}: {e}",
                        self.path.display()
                    )),
                    _ => Ok(()),
                };
            }
            serde_json::to_vec_pretty(&File {
                charges: entries.clone(),
            })?
        };
        let tmp = self.path.with_extension("tmp");
        {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", tmp.display()))?;
            f.write_all(&json)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &self.path)
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", self.path.display()))?;
        Ok(())
    }

    /// Takes charges the web service posted for session `sid` (`live`: still running here).
    pub(crate) async fn post<F, Fut>(
        &self,
        sid: &str,
        live: bool,
        mut charges: Vec<Charge>,
        info: F,
    ) -> Result<Vec<Answer>, Refusal>
    where
        F: FnOnce(String) -> Fut,
        Fut: std::future::Future<Output = Option<Vec<u8>>>,
    {
        if charges.is_empty() {
            return Err(Refusal::Invalid("charges is empty".into()));
        }
        let hold = self.mode == Mode::OnBye && live;
        let by_info = self.mode == Mode::Info && live;
        if !hold && !by_info && self.relay.is_none() {
            return Err(Refusal::NoWay(if self.mode == Mode::OnBye {
                format!(
                    "session {sid} is not running here, and without --grpc its charges cannot reach the relay"
                )
            } else {
                "no --grpc: give the relay's billing endpoint (or use --billing on-bye)".into()
            }));
        }
        // A charge without a time keeps none: the relay records it at its arrival, and a retry
        // without a time matches it whenever it comes.
        for c in &mut charges {
            if c.session_id.is_empty() {
                c.session_id = sid.to_string();
            } else if c.session_id != sid {
                return Err(Refusal::Invalid(format!(
                    "charge {:?} names session {}, posted to session {sid}",
                    c.idempotency_key, c.session_id
                )));
            }
            c.check().map_err(|(_, m)| {
                Refusal::Invalid(format!("charge {:?}: {m}", c.idempotency_key))
            })?;
        }
        // Keys already waiting here: the same charge is answered as waiting, another refused.
        let mut answers: Vec<Option<Answer>> = vec![None; charges.len()];
        let mut fresh = Vec::new();
        {
            let mut entries = lock(&self.entries);
            for (i, c) in charges.iter().enumerate() {
                let waiting = entries
                    .iter()
                    .find(|e| e.charge.idempotency_key == c.idempotency_key);
                match waiting {
                    Some(e) if e.charge == *c => {
                        answers[i] = Some(Answer::waiting(
                            c,
                            if e.state == State::Held {
                                "held"
                            } else {
                                "pending"
                            },
                            e.last_error.clone(),
                        ));
                    }
                    Some(_) => {
                        return Err(Refusal::Conflict(format!(
                            "idempotency_key {:?} is already waiting here for a different charge",
                            c.idempotency_key
                        )));
                    }
                    None if fresh
                        .iter()
                        .any(|(_, f): &(usize, Charge)| f.idempotency_key == c.idempotency_key) =>
                    {
                        return Err(Refusal::Invalid(format!(
                            "idempotency_key {:?} appears twice in one request",
                            c.idempotency_key
                        )));
                    }
                    None => fresh.push((i, c.clone())),
                }
            }
            for (_, c) in &fresh {
                entries.push(Entry {
                    charge: c.clone(),
                    state: if hold { State::Held } else { State::Pending },
                    attempts: 0,
                    last_error: None,
                    next_try: None,
                });
            }
        }
        if let Err(e) = self.save() {
            // Not kept, not taken: the web service must send them again.
            let keys: Vec<String> = fresh
                .iter()
                .map(|(_, c)| c.idempotency_key.clone())
                .collect();
            lock(&self.entries).retain(|e| !keys.contains(&e.charge.idempotency_key));
            return Err(Refusal::NoWay(format!(
                "the agent cannot keep the charges: {e}"
            )));
        }
        let mut fresh_answered = false;
        if by_info && !fresh.is_empty() {
            let batch: Vec<Charge> = fresh.iter().map(|(_, c)| c.clone()).collect();
            let body = Charges {
                charges: batch.clone(),
            }
            .to_json();
            if let Some(answer) = info(body).await
                && let Some(results) = self.answered_in_info(&batch, &answer)
            {
                for ((i, _), r) in fresh.iter().zip(results) {
                    answers[*i] = Some(r);
                }
                fresh_answered = true;
            }
        }
        if fresh_answered {
            // Answered in the INFO's response.
        } else if hold {
            for (i, c) in &fresh {
                answers[*i] = Some(Answer::waiting(c, "held", None));
            }
        } else if !fresh.is_empty() && self.relay.is_none() {
            for (i, c) in &fresh {
                answers[*i] = Some(Answer::waiting(
                    c,
                    "pending",
                    Some(
                        "the INFO got no answer, and without --grpc there is no other way yet"
                            .into(),
                    ),
                ));
            }
        } else if !fresh.is_empty() {
            let batch: Vec<Charge> = fresh.iter().map(|(_, c)| c.clone()).collect();
            match self.deliver(&batch).await {
                Ok(results) => {
                    for ((i, _), r) in fresh.iter().zip(results) {
                        answers[*i] = Some(r);
                    }
                }
                Err(why) => {
                    for (i, c) in &fresh {
                        answers[*i] = Some(Answer::waiting(c, "pending", Some(why.clone())));
                    }
                    self.wake.notify_one();
                }
            }
        }
        Ok(answers.into_iter().flatten().collect())
    }

    /// The relay answered charges sent in an INFO: the answered ones leave the file; `None`
    /// when the answer holds no results (they stay for gRPC).
    pub(crate) fn answered_in_info(&self, charges: &[Charge], body: &[u8]) -> Option<Vec<Answer>> {
        let results = proto::charge::Results::parse(body)?.results;
        if results.len() != charges.len() {
            return None;
        }
        Some(self.answered(charges, &results))
    }

    /// The relay answered these charges (one result each): they leave the file, and each
    /// answer is an event.
    fn answered(&self, charges: &[Charge], results: &[ChargeResult]) -> Vec<Answer> {
        lock(&self.entries).retain(|e| {
            !results
                .iter()
                .any(|r| r.idempotency_key == e.charge.idempotency_key)
        });
        if let Err(e) = self.save() {
            tracing::warn!(error = %e, "Cannot rewrite the charges file");
        }
        for (c, r) in charges.iter().zip(results) {
            self.out.emit(Event::Charge {
                sid: c.session_id.clone(),
                key: c.idempotency_key.clone(),
                outcome: outcome_text(r.outcome).into(),
                message: r.message.clone(),
            });
        }
        results.iter().map(Answer::of).collect()
    }

    /// Sends charges over gRPC; the answered ones leave the file. `Err` when the relay could
    /// not be asked (they stay, for the next try).
    async fn deliver(&self, charges: &[Charge]) -> Result<Vec<Answer>, String> {
        let Some(relay) = &self.relay else {
            return Err("no --grpc".into());
        };
        let mut req = tonic::Request::new(v1::ReportChargesRequest {
            charges: charges.iter().cloned().map(Into::into).collect(),
        });
        req.metadata_mut()
            .insert("authorization", relay.auth.clone());
        let mut client = relay.client.clone();
        let outcome = match client.report_charges(req).await {
            Ok(resp) => {
                let results: Vec<ChargeResult> = resp
                    .into_inner()
                    .results
                    .into_iter()
                    .filter_map(proto::grpc::result_from_v1)
                    .collect();
                if results.len() != charges.len() {
                    Err(format!(
                        "the relay answered {} results for {} charges",
                        results.len(),
                        charges.len()
                    ))
                } else {
                    Ok(results)
                }
            }
            Err(status) => Err(format!(
                "the relay's billing endpoint: {}",
                status.message()
            )),
        };
        match outcome {
            Ok(results) => Ok(self.answered(charges, &results)),
            Err(why) => {
                let mut entries = lock(&self.entries);
                for e in entries.iter_mut() {
                    if charges
                        .iter()
                        .any(|c| c.idempotency_key == e.charge.idempotency_key)
                    {
                        e.attempts += 1;
                        e.last_error = Some(why.clone());
                        e.state = State::Pending;
                        e.next_try = Some(Instant::now() + backoff(e.attempts));
                    }
                }
                drop(entries);
                let _ = self.save();
                Err(why)
            }
        }
    }

    /// The body of the 200 OK for the client's BYE: the session's held charges. They stay in
    /// the file, to be confirmed over gRPC shortly (the relay answers them as duplicates).
    pub(crate) fn for_bye(&self, sid: &str) -> Option<String> {
        let mut entries = lock(&self.entries);
        let mut charges = Vec::new();
        for e in entries.iter_mut() {
            if e.charge.session_id == sid && e.state == State::Held {
                charges.push(e.charge.clone());
                e.state = State::Pending;
                e.next_try = Some(Instant::now() + CONFIRM_AFTER);
            }
        }
        if self.relay.is_none() {
            // Nothing to confirm with: the 200 for BYE is their only way.
            entries.retain(|e| e.charge.session_id != sid);
        }
        drop(entries);
        if charges.is_empty() {
            return None;
        }
        let _ = self.save();
        self.wake.notify_one();
        Some(Charges { charges }.to_json())
    }

    /// The session ended some other way: its held charges go over gRPC now.
    pub(crate) fn session_ended(&self, sid: &str) {
        let mut any = false;
        for e in lock(&self.entries).iter_mut() {
            if e.charge.session_id == sid && e.state == State::Held {
                e.state = State::Pending;
                e.next_try = None;
                any = true;
            }
        }
        if any {
            let _ = self.save();
            self.wake.notify_one();
        }
    }

    /// Sends what is due, again and again, until stopped; the held charges of sessions no
    /// longer live here (ended any way but the client's BYE) go too.
    pub(crate) async fn run(self: Arc<Self>, sessions: Arc<crate::sessions::Sessions>) {
        loop {
            let ended: Vec<String> = lock(&self.entries)
                .iter()
                .filter(|e| e.state == State::Held && !sessions.is_live(&e.charge.session_id))
                .map(|e| e.charge.session_id.clone())
                .collect();
            for sid in ended {
                self.session_ended(&sid);
            }
            let now = Instant::now();
            let (due, next): (Vec<Charge>, Option<Instant>) = {
                let entries = lock(&self.entries);
                let due = entries
                    .iter()
                    .filter(|e| e.state == State::Pending && e.next_try.is_none_or(|t| t <= now))
                    .take(1000)
                    .map(|e| e.charge.clone())
                    .collect();
                let next = entries
                    .iter()
                    .filter(|e| e.state == State::Pending)
                    .filter_map(|e| e.next_try)
                    .filter(|t| *t > now)
                    .min();
                (due, next)
            };
            if !due.is_empty() && self.relay.is_some() {
                if let Err(why) = self.deliver(&due).await {
                    tracing::warn!(charges = due.len(), error = %why, "Charges not delivered yet; trying again");
                }
                continue;
            }
            // Held charges wait for their session's end, looked at every second.
            let held = lock(&self.entries).iter().any(|e| e.state == State::Held);
            let sleep = next
                .map(|t| t.saturating_duration_since(now))
                .unwrap_or(MAX_BACKOFF)
                .min(if held {
                    Duration::from_secs(1)
                } else {
                    MAX_BACKOFF
                });
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(sleep) => {}
            }
        }
    }
}

/// 1 s, 2 s, 4 s, … up to a minute.
fn backoff(attempts: u32) -> Duration {
    Duration::from_secs(1u64 << attempts.min(6).saturating_sub(1)).min(MAX_BACKOFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_a_minute() {
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(2), Duration::from_secs(2));
        assert_eq!(backoff(6), Duration::from_secs(32));
        assert_eq!(backoff(60), Duration::from_secs(32));
    }
}
