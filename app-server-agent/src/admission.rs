//! The reception decision for a vouched-for INVITE, in order: the service is one of ours (else
//! 404), capacity is not reached (else 486 with Retry-After), and, with `--decision-webhook`,
//! the vendor's webhook says yes (403 with its reason when it says no; 503 with Retry-After when
//! it cannot be asked).
//!
//! Does not check where the INVITE came from ([`crate::assertion`]) nor answer it (the agent
//! does). The webhook is plain HTTP/1.1 only and gets 3 seconds.

use crate::sessions::{Sessions, Slot};
use anyhow::bail;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// How long the webhook may take, connection included.
const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(3);
/// Largest webhook answer read.
const MAX_WEBHOOK_ANSWER: usize = 64 * 1024;
/// Longest reason phrase taken from the webhook.
const MAX_REASON_CHARS: usize = 100;

/// A refusal: the SIP status and reason phrase, Retry-After if any, and words for the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub(crate) status: u16,
    pub(crate) reason: String,
    pub(crate) retry_after: Option<u32>,
    pub(crate) why: String,
}

/// What the webhook is told about a session.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct DecisionRequest<'a> {
    pub(crate) user: &'a str,
    pub(crate) session_id: &'a str,
    pub(crate) service: &'a str,
    pub(crate) detail: Option<&'a str>,
    pub(crate) fields: &'a BTreeMap<String, String>,
    pub(crate) call_id: &'a str,
    pub(crate) server: &'a str,
}

#[derive(Debug, Deserialize)]
struct WebhookAnswer {
    accept: bool,
    #[serde(default)]
    reason: Option<String>,
}

/// The reception rules of this agent.
#[derive(Debug)]
pub(crate) struct Admission {
    services: Vec<String>,
    capacity: Option<usize>,
    webhook: Option<Webhook>,
    retry_after: u32,
}

impl Admission {
    pub(crate) fn new(
        services: Vec<String>,
        capacity: Option<usize>,
        webhook: Option<Webhook>,
        retry_after: u32,
    ) -> Admission {
        Admission {
            services,
            capacity,
            webhook,
            retry_after,
        }
    }

    /// Step 1: the service is one this agent delivers.
    pub(crate) fn check_service(&self, service: &str) -> Result<(), Refusal> {
        if self.services.iter().any(|s| s == service) {
            Ok(())
        } else {
            Err(Refusal {
                status: 404,
                reason: "Service not offered here".into(),
                retry_after: None,
                why: format!("service {service:?} is not one of ours"),
            })
        }
    }

    /// Step 2: a capacity slot.
    pub(crate) fn reserve(&self, sessions: &Arc<Sessions>) -> Result<Slot, Refusal> {
        sessions.reserve(self.capacity).ok_or_else(|| {
            let cap = self.capacity.unwrap_or(0);
            Refusal {
                status: 486,
                reason: "Busy Here".into(),
                retry_after: Some(self.retry_after),
                why: format!("capacity {cap} reached"),
            }
        })
    }

    /// Step 3: the webhook's verdict (accept when there is no webhook).
    pub(crate) async fn ask(&self, req: &DecisionRequest<'_>) -> Result<(), Refusal> {
        let Some(hook) = &self.webhook else {
            return Ok(());
        };
        let unavailable = |why: String| Refusal {
            status: 503,
            reason: "Service Unavailable".into(),
            retry_after: Some(self.retry_after),
            why: format!("decision webhook unavailable: {why}"),
        };
        let body = serde_json::to_vec(req).unwrap_or_default();
        let (status, answer) = match tokio::time::timeout(WEBHOOK_TIMEOUT, hook.post(body)).await {
            Err(_) => {
                return Err(unavailable(format!(
                    "no answer within {} s",
                    WEBHOOK_TIMEOUT.as_secs()
                )));
            }
            Ok(Err(e)) => return Err(unavailable(e)),
            Ok(Ok(r)) => r,
        };
        if !status.is_success() {
            return Err(unavailable(format!("it answered HTTP {status}")));
        }
        match serde_json::from_slice::<WebhookAnswer>(&answer) {
            Ok(WebhookAnswer { accept: true, .. }) => Ok(()),
            Ok(WebhookAnswer {
                accept: false,
                reason,
            }) => {
                let reason = sanitize_reason(reason.as_deref().unwrap_or(""));
                Err(Refusal {
                    status: 403,
                    why: format!("the decision webhook said no: {reason}"),
                    reason,
                    retry_after: None,
                })
            }
            Err(e) => Err(unavailable(format!(
                "its answer is not {{\"accept\": true|false, \"reason\": \"…\"}} ({e}): {}",
                excerpt(&answer)
            ))),
        }
    }
}

/// The start of a webhook's answer for the operator's log: one line, control characters
/// escaped, at most 80 characters.
fn excerpt(body: &[u8]) -> String {
    const MAX: usize = 80;
    let text = String::from_utf8_lossy(body);
    let mut out = String::new();
    for c in text.chars().take(MAX) {
        if c.is_control() {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    if text.chars().count() > MAX {
        out.push('…');
    }
    if body.is_empty() {
        "an empty body".into()
    } else {
        out
    }
}

/// One line of at most 100 characters, without control characters; "Refused" when empty.
pub(crate) fn sanitize_reason(s: &str) -> String {
    let line: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let words: Vec<&str> = line.split_whitespace().collect();
    let joined = words.join(" ");
    let cut: String = joined.chars().take(MAX_REASON_CHARS).collect();
    let cut = cut.trim_end().to_string();
    if cut.is_empty() {
        "Refused".to_string()
    } else {
        cut
    }
}

/// A plain `http://` webhook URL, split for the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Webhook {
    /// Host name or IP (IPv6 without brackets).
    host: String,
    port: u16,
    /// `Host` header value.
    authority: String,
    /// Path and query, at least `/`.
    path: String,
}

impl Webhook {
    pub(crate) fn parse(url: &str) -> anyhow::Result<Webhook> {
        let url = url.trim();
        let lower = url.to_ascii_lowercase();
        if lower.starts_with("https://") {
            bail!(
                "--decision-webhook must be a plain http:// URL (https is not supported): {url:?}"
            );
        }
        let Some(rest) = lower.strip_prefix("http://").map(|_| &url[7..]) else {
            bail!("--decision-webhook is not an http:// URL: {url:?}");
        };
        if url.chars().any(|c| c.is_control() || c.is_whitespace()) {
            bail!("--decision-webhook contains spaces or control characters: {url:?}");
        }
        let rest = rest.split('#').next().unwrap_or("");
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let path = if path.starts_with('?') {
            format!("/{path}")
        } else {
            path.to_string()
        };
        if authority.is_empty() || authority.contains('@') {
            bail!("--decision-webhook needs a host (and no user info): {url:?}");
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let Some((h, after)) = v6.split_once(']') else {
                bail!("--decision-webhook has a bad IPv6 host: {url:?}");
            };
            (h, after.strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        let port = match port {
            Some(p) => match p.parse::<u16>() {
                Ok(p) if p != 0 => p,
                _ => bail!("--decision-webhook has a bad port: {url:?}"),
            },
            None => 80,
        };
        if host.is_empty() {
            bail!("--decision-webhook needs a host: {url:?}");
        }
        Ok(Webhook {
            host: host.to_string(),
            port,
            authority: authority.to_string(),
            path,
        })
    }

    /// POSTs the JSON body; the status and (bounded) body of the answer.
    async fn post(&self, body: Vec<u8>) -> Result<(hyper::StatusCode, Bytes), String> {
        let stream = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| format!("cannot connect to {}: {e}", self.authority))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("HTTP handshake with {} failed: {e}", self.authority))?;
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        let result = async {
            let req = hyper::Request::builder()
                .method(hyper::Method::POST)
                .uri(self.path.as_str())
                .header(hyper::header::HOST, self.authority.as_str())
                .header(hyper::header::CONTENT_TYPE, "application/json")
                .header(hyper::header::ACCEPT, "application/json")
                .header(hyper::header::USER_AGENT, crate::USER_AGENT)
                .body(Full::new(Bytes::from(body)))
                .map_err(|e| format!("cannot build the request: {e}"))?;
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| format!("request to {} failed: {e}", self.authority))?;
            let status = resp.status();
            let body = Limited::new(resp.into_body(), MAX_WEBHOOK_ANSWER)
                .collect()
                .await
                .map_err(|e| format!("reading the answer failed: {e}"))?
                .to_bytes();
            Ok((status, body))
        }
        .await;
        driver.abort();
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webhook_urls() {
        let w = Webhook::parse("http://127.0.0.1:8080/decide?x=1").unwrap();
        assert_eq!(
            (w.host.as_str(), w.port, w.path.as_str()),
            ("127.0.0.1", 8080, "/decide?x=1")
        );
        let w = Webhook::parse("http://[::1]").unwrap();
        assert_eq!((w.host.as_str(), w.port, w.path.as_str()), ("::1", 80, "/"));
        let w = Webhook::parse("HTTP://hooks.example?y").unwrap();
        assert_eq!(
            (w.authority.as_str(), w.path.as_str()),
            ("hooks.example", "/?y")
        );
        assert!(Webhook::parse("https://x/").is_err());
        assert!(Webhook::parse("http://user@x/").is_err());
        assert!(Webhook::parse("http://x:99999/").is_err());
        assert!(Webhook::parse("ftp://x/").is_err());
    }

    #[test]
    fn reasons_are_one_short_line() {
        assert_eq!(sanitize_reason("  Not\r\nyour   turn\t"), "Not your turn");
        assert_eq!(sanitize_reason(""), "Refused");
        assert_eq!(sanitize_reason(&"é".repeat(300)).chars().count(), 100);
    }

    #[test]
    fn unknown_services_get_404() {
        let a = Admission::new(vec!["wine".into()], None, None, 30);
        assert!(a.check_service("wine").is_ok());
        assert_eq!(a.check_service("beer").unwrap_err().status, 404);
    }
}
