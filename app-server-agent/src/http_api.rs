//! The local HTTP API for the vendor's web service (HTTP/1.1, JSON answers):
//!
//! - `POST /introspect` (RFC 7662), `token=…` as a form or `{"token": "…"}`: `{"active": true,
//!   "sub", "username", "sid", "service", "scope", "detail", "server", "iat", "exp"}` for the
//!   token of a live, acknowledged session, else `{"active": false}` alone; 400 without a
//!   token. A token whose session waits for its ACK is answered once the ACK came (at most
//!   2 s later).
//! - `POST /close`, `sid=…` (form or JSON): ends the session with a BYE; `{"closed": true}`,
//!   or 404 `{"closed": false, …}`.
//! - `GET /sessions`: `[{"sid", "user", "service", "started_at", "acked"}]`.
//! - `POST /sessions/{id}/charges`, JSON `{"charges": [{"idempotency_key", "item_id",
//!   "item_name", "unit_price_minor", "quantity", "currency"}, …]}` (plus the optional
//!   `occurred_at_ms`, `description`, `kind: "refund"` with `refunds`: the charge document of
//!   the relay's contract): `{"results": [{"idempotency_key", "outcome", "charge_id",
//!   "amount_minor", "message"}]}`, one per charge. The outcome is the relay's (`recorded`,
//!   `duplicate`, `conflict`, `invalid`, `not_found`, `forbidden`, `refused`), or `held`
//!   (`--billing on-bye`: it goes with the session's end) or `pending` (the relay was not
//!   reached: kept and sent again). Status 200 when every charge is recorded, 202 when some
//!   wait, 409 for a key used for a different charge (naming it), 400 for bad input (naming the
//!   field), 403/404/422 for the relay's other refusals.
//! - `GET /metrics`: the agent's metrics in Prometheus' text format (`siprelay_agent_…`,
//!   listed in docs/metrics.md).
//! - `GET /health`: `{"status": "ok", …}`; 503 with `{"status": "not-vouched", "problem"}` while
//!   the relay's assertions do not verify with the account's password (it was changed).
//!
//! Anything else is 404 (405 for another method on these paths). Request bodies are capped at
//! 64 KiB. The API has no authentication of its own: bind it to loopback or a private address.
//! It never shows a token other than the one it was asked about.
//!
//! Only requests whose `Host` names the API's own listening address are answered (421
//! otherwise): the IP literal it listens on (any IP literal when it listens on every address),
//! or `localhost` when it listens on loopback, with its port. A web page on another site that
//! rebinds its own name to 127.0.0.1 (DNS rebinding) sends its own name in `Host` and gets
//! nothing.

use crate::core::Core;
use crate::now_unix;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{ALLOW, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

/// How long `/introspect` waits for the ACK of a session that has none yet.
const ACK_GRACE: Duration = Duration::from_secs(2);

/// Largest request body read.
const MAX_BODY: usize = 64 * 1024;
/// Most connections served at once; more are closed at accept.
const MAX_CONNECTIONS: usize = 256;

/// Serves the API on `listener` until the task is aborted (which also ends its connections).
pub(crate) async fn serve(listener: TcpListener, core: Arc<Core>) {
    let Ok(local) = listener.local_addr() else {
        return;
    };
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    if conns.len() >= MAX_CONNECTIONS {
                        tracing::warn!(%peer, "Too many HTTP connections: closing a new one");
                        continue;
                    }
                    let core = core.clone();
                    conns.spawn(async move {
                        let service = hyper::service::service_fn(move |req| {
                            let core = core.clone();
                            async move { Ok::<_, Infallible>(handle(&core, local, req).await) }
                        });
                        let served = hyper::server::conn::http1::Builder::new()
                            .timer(TokioTimer::new())
                            .header_read_timeout(Duration::from_secs(10))
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                        if let Err(e) = served {
                            tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "Accepting an HTTP connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

type Answer = Response<Full<Bytes>>;

fn json_answer(status: StatusCode, body: &Value) -> Answer {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    h.insert(
        CACHE_CONTROL,
        hyper::header::HeaderValue::from_static("no-store"),
    );
    resp
}

fn error(status: StatusCode, code: &str, description: &str) -> Answer {
    json_answer(
        status,
        &json!({"error": code, "error_description": description}),
    )
}

/// Whether the request carries the configured bearer token (compared in constant time).
fn authorised(core: &Core, req: &Request<Incoming>) -> bool {
    let Some(expected) = core.http_token() else {
        return true;
    };
    let given = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("")
        .trim();
    let (a, b) = (given.as_bytes(), expected.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether the request's `Host` names this API's listening address `local`.
fn host_is_ours(req: &Request<Incoming>, local: SocketAddr) -> bool {
    let Some(host) = req
        .headers()
        .get(hyper::header::HOST)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    host_names(host.trim(), local)
}

fn host_names(host: &str, local: SocketAddr) -> bool {
    // `[v6]:port`, `v4:port`, `name:port`; no port means 80.
    let (name, port) = match host.rsplit_once(':') {
        Some((n, p)) if !n.is_empty() && (n.starts_with('[') || !n.contains(':')) => {
            match p.parse::<u16>() {
                Ok(p) => (n, p),
                Err(_) => return false,
            }
        }
        _ => (host, 80),
    };
    if port != local.port() {
        return false;
    }
    let name = name.trim_start_matches('[').trim_end_matches(']');
    match name.parse::<IpAddr>() {
        Ok(ip) => ip == local.ip() || local.ip().is_unspecified(),
        Err(_) => {
            name.eq_ignore_ascii_case("localhost")
                && (local.ip().is_loopback() || local.ip().is_unspecified())
        }
    }
}

async fn handle(core: &Arc<Core>, local: SocketAddr, req: Request<Incoming>) -> Answer {
    if !host_is_ours(&req, local) {
        return error(
            StatusCode::MISDIRECTED_REQUEST,
            "misdirected_request",
            &format!("the Host header must name this API's address ({local})"),
        );
    }
    if !authorised(core, &req) {
        let mut resp = error(
            StatusCode::UNAUTHORIZED,
            "invalid_token",
            "send Authorization: Bearer with the agent's --http-token",
        );
        resp.headers_mut().insert(
            hyper::header::WWW_AUTHENTICATE,
            hyper::header::HeaderValue::from_static("Bearer"),
        );
        return resp;
    }
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    match (method, path.as_str()) {
        (Method::POST, "/introspect") => {
            let params = match read_params(req).await {
                Ok(p) => p,
                Err(resp) => return resp,
            };
            let Some(token) = params
                .get("token")
                .map(|t| t.trim())
                .filter(|t| !t.is_empty())
            else {
                return error(StatusCode::BAD_REQUEST, "invalid_request", "missing token");
            };
            // The client opens the URL as it sends its ACK, so a visitor can come a moment
            // before the ACK does: a session waiting for its ACK is given a little time.
            let deadline = std::time::Instant::now() + ACK_GRACE;
            loop {
                if let Some(i) = core.sessions.introspect(token, core.account(), now_unix()) {
                    return json_answer(
                        StatusCode::OK,
                        &serde_json::to_value(i).unwrap_or_else(|_| json!({"active": false})),
                    );
                }
                if !core.sessions.token_awaits_ack(token) || std::time::Instant::now() > deadline {
                    return json_answer(StatusCode::OK, &json!({"active": false}));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        (Method::POST, "/close") => {
            let params = match read_params(req).await {
                Ok(p) => p,
                Err(resp) => return resp,
            };
            let Some(sid) = params
                .get("sid")
                .map(|s| s.trim())
                .filter(|s| !s.is_empty())
            else {
                return error(StatusCode::BAD_REQUEST, "invalid_request", "missing sid");
            };
            if core.close(sid) {
                json_answer(StatusCode::OK, &json!({"closed": true, "sid": sid}))
            } else {
                json_answer(
                    StatusCode::NOT_FOUND,
                    &json!({"closed": false, "error": "not_found",
                            "error_description": "no live session with that sid"}),
                )
            }
        }
        (Method::POST, p) if charges_path(p).is_some() => {
            let sid = charges_path(p).unwrap_or_default().to_string();
            post_charges(core, &sid, req).await
        }
        (Method::POST, p) if session_path(p, "change").is_some() => {
            let sid = session_path(p, "change").unwrap_or_default().to_string();
            post_change(core, &sid, req).await
        }
        (Method::POST, p) if session_path(p, "refer").is_some() => {
            let sid = session_path(p, "refer").unwrap_or_default().to_string();
            post_refer(core, &sid, req).await
        }
        (_, p)
            if charges_path(p).is_some()
                || session_path(p, "change").is_some()
                || session_path(p, "refer").is_some() =>
        {
            let mut resp = error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "use POST",
            );
            resp.headers_mut()
                .insert(ALLOW, hyper::header::HeaderValue::from_static("POST"));
            resp
        }
        (Method::GET, "/metrics") => {
            let m = &crate::metrics::METRICS;
            m.sessions_open
                .set(i64::try_from(core.sessions.live()).unwrap_or(i64::MAX));
            let mut resp = Response::new(Full::new(Bytes::from(m.encode())));
            resp.headers_mut().insert(
                CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            resp
        }
        (Method::GET, "/sessions") => json_answer(
            StatusCode::OK,
            &serde_json::to_value(core.sessions.list()).unwrap_or_else(|_| json!([])),
        ),
        (Method::GET, "/health") => match core.vouching_problem() {
            None => json_answer(
                StatusCode::OK,
                &json!({
                    "status": "ok",
                    "server": core.account(),
                    "services": core.services(),
                    "live_sessions": core.sessions.live(),
                }),
            ),
            // Every session is refused: a monitor must see it.
            Some(problem) => json_answer(
                StatusCode::SERVICE_UNAVAILABLE,
                &json!({
                    "status": "not-vouched",
                    "problem": problem,
                    "server": core.account(),
                    "services": core.services(),
                    "live_sessions": core.sessions.live(),
                }),
            ),
        },
        (_, "/introspect" | "/close" | "/sessions" | "/health" | "/metrics") => {
            let allow = if path == "/sessions" || path == "/health" || path == "/metrics" {
                "GET"
            } else {
                "POST"
            };
            let mut resp = error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                &format!("use {allow}"),
            );
            resp.headers_mut()
                .insert(ALLOW, hyper::header::HeaderValue::from_static(allow));
            resp
        }
        _ => error(StatusCode::NOT_FOUND, "not_found", "no such endpoint"),
    }
}

/// A request's media type (the `Content-Type` without parameters), lower case.
fn media_type(req: &Request<Incoming>) -> Option<String> {
    req.headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
}

/// The session id of `/sessions/{id}/charges`.
fn charges_path(path: &str) -> Option<&str> {
    let id = path.strip_prefix("/sessions/")?.strip_suffix("/charges")?;
    (!id.is_empty() && !id.contains('/')).then_some(id)
}

/// The body of a POST that must be JSON (`application/json`, or `also`), at most 64 KiB; else
/// the answer naming the problem (`what`: what the body should hold).
async fn json_body(
    req: Request<Incoming>,
    also: Option<&str>,
    what: &str,
) -> Result<bytes::Bytes, Answer> {
    if media_type(&req)
        .as_deref()
        .is_some_and(|t| t != "application/json" && Some(t) != also)
    {
        return Err(error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "invalid_request",
            &format!("send {what} as application/json"),
        ));
    }
    match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => Ok(b.to_bytes()),
        Err(_) => Err(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request",
            "body unreadable or larger than 64 KiB",
        )),
    }
}

/// The session id of `/sessions/{id}/{what}`.
fn session_path<'a>(path: &'a str, what: &str) -> Option<&'a str> {
    let id = path
        .strip_prefix("/sessions/")?
        .strip_suffix(what)?
        .strip_suffix('/')?;
    (!id.is_empty() && !id.contains('/')).then_some(id)
}

/// `POST /sessions/{id}/refer` with `{"service": "beer"}` (and `"keep": true` to keep this
/// session running beside the new one): a REFER to the client inside the session. 202 once the
/// client accepted it (it then places the new session through the relay; its NOTIFYs are lines
/// of the agent's output); 404 without such a live session; 400 for a bad body; 409 when the
/// client refused it (baresip 1.0 without call transfer, for instance); 504 without an answer.
async fn post_refer(core: &Arc<Core>, sid: &str, req: Request<Incoming>) -> Answer {
    let body = match json_body(req, None, "{\"service\": NAME}").await {
        Ok(b) => b,
        Err(answer) => return answer,
    };
    let value: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                &format!("not JSON: {e}"),
            );
        }
    };
    let service = value
        .get("service")
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|s| is_service_name(s));
    let Some(service) = service else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "name the service to refer the client to, e.g. {\"service\": \"beer\"}",
        );
    };
    let keep = match value.get("keep") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "keep must be true or false",
            );
        }
    };
    match core.refer(sid, service, keep).await {
        crate::change::Referred::Accepted { status } => json_answer(
            StatusCode::ACCEPTED,
            &json!({"referred": true, "session_id": sid, "service": service, "keep": keep,
                    "status": status}),
        ),
        crate::change::Referred::NotLive => error(
            StatusCode::NOT_FOUND,
            "not_found",
            "no live, acknowledged session with that id",
        ),
        crate::change::Referred::Refused { status, reason } => json_answer(
            StatusCode::CONFLICT,
            &json!({"referred": false, "error": "refer_refused",
                    "error_description": format!("{status} {reason}"),
                    "status": status, "reason": reason}),
        ),
        crate::change::Referred::NoAnswer => error(
            StatusCode::GATEWAY_TIMEOUT,
            "no_answer",
            "the client did not answer the REFER",
        ),
    }
}

/// A service name as the relay's URIs carry it (letters, digits, `-`, `_`, `.`).
fn is_service_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// `POST /sessions/{id}/change`: the new service-request fields as a JSON object of strings
/// (`{"detail": "a dark beer"}`). 200 once the client accepted the change; 404 without such a
/// live session; 400 for a body that is no service request; 409 when the relay or the client
/// refused it (with the SIP status and phrase, and `transfer_to` when the relay named the
/// service to transfer to instead); 504 when nothing answered.
async fn post_change(core: &Arc<Core>, sid: &str, req: Request<Incoming>) -> Answer {
    let body = match json_body(
        req,
        Some(proto::service::SERVICE_REQUEST_TYPE),
        "the service request",
    )
    .await
    {
        Ok(b) => b,
        Err(answer) => return answer,
    };
    let request = match proto::service::ServiceRequest::parse(&body) {
        Ok(r) if !r.fields.is_empty() => r,
        Ok(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "name what the session changes to, e.g. {\"detail\": \"a dark beer\"}",
            );
        }
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_request", &e.to_string()),
    };
    match core.change(sid, &request).await {
        crate::change::Changed::Done { method } => json_answer(
            StatusCode::OK,
            &json!({"changed": true, "session_id": sid, "method": method,
                    "detail": request.detail()}),
        ),
        crate::change::Changed::NotLive => error(
            StatusCode::NOT_FOUND,
            "not_found",
            "no live, acknowledged session with that id",
        ),
        crate::change::Changed::Refused {
            status,
            reason,
            transfer_to,
        } => json_answer(
            StatusCode::CONFLICT,
            &json!({"changed": false, "error": "change_refused",
                    "error_description": format!("{status} {reason}"),
                    "status": status, "reason": reason, "transfer_to": transfer_to}),
        ),
        crate::change::Changed::NoAnswer => error(
            StatusCode::GATEWAY_TIMEOUT,
            "no_answer",
            "neither the relay nor the client answered the change",
        ),
    }
}

/// `POST /sessions/{id}/charges`.
async fn post_charges(core: &Arc<Core>, sid: &str, req: Request<Incoming>) -> Answer {
    let body = match json_body(req, Some(proto::charge::CONTENT_TYPE), "the charges").await {
        Ok(b) => b,
        Err(answer) => return answer,
    };
    let doc = match proto::charge::Charges::parse(&body) {
        Ok(d) => d,
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_request", &e),
    };
    let live = core.sessions.is_live(sid);
    let info = |body: String| async move {
        core.send_charges_info(sid, body)
            .await
            .map(|r| r.body.to_vec())
    };
    let answers = match core.billing.post(sid, live, doc.charges, info).await {
        Ok(a) => a,
        Err(crate::billing::Refusal::Invalid(m)) => {
            return error(StatusCode::BAD_REQUEST, "invalid_request", &m);
        }
        Err(crate::billing::Refusal::Conflict(m)) => {
            return error(StatusCode::CONFLICT, "conflict", &m);
        }
        Err(crate::billing::Refusal::NoWay(m)) => {
            return error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", &m);
        }
    };
    let has = |o: &str| answers.iter().any(|a| a.outcome == o);
    let status = if has("conflict") {
        StatusCode::CONFLICT
    } else if has("invalid") {
        StatusCode::BAD_REQUEST
    } else if has("forbidden") {
        StatusCode::FORBIDDEN
    } else if has("not_found") {
        StatusCode::NOT_FOUND
    } else if has("refused") {
        StatusCode::UNPROCESSABLE_ENTITY
    } else if has("held") || has("pending") {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    json_answer(status, &json!({ "results": answers }))
}

/// The parameters of a form (`application/x-www-form-urlencoded`) or JSON object body; string
/// values only.
async fn read_params(req: Request<Incoming>) -> Result<HashMap<String, String>, Answer> {
    let content_type = media_type(&req);
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            let too_large = e
                .downcast_ref::<http_body_util::LengthLimitError>()
                .is_some();
            return Err(if too_large {
                error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "invalid_request",
                    "body larger than 64 KiB",
                )
            } else {
                error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "cannot read the body",
                )
            });
        }
    };
    let json = match content_type.as_deref() {
        Some("application/json") => true,
        Some("application/x-www-form-urlencoded") => false,
        None | Some("") => body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{'),
        Some(other) => {
            return Err(error(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "invalid_request",
                &format!(
                    "content type {other} not supported (use application/x-www-form-urlencoded or application/json)"
                ),
            ));
        }
    };
    if json {
        let Ok(Value::Object(map)) = serde_json::from_slice::<Value>(&body) else {
            return Err(error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "body is not a JSON object",
            ));
        };
        Ok(map
            .into_iter()
            .filter_map(|(k, v)| match v {
                Value::String(s) => Some((k, s)),
                _ => None,
            })
            .collect())
    } else {
        let Ok(text) = std::str::from_utf8(&body) else {
            return Err(error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "form body is not UTF-8",
            ));
        };
        Ok(parse_form(text))
    }
}

/// `a=1&b=x+y%21` → {a: "1", b: "x y!"}; the first value of a repeated name wins.
fn parse_form(text: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for pair in text.trim().split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        out.entry(percent_decode(k))
            .or_insert_with(|| percent_decode(v));
    }
    out
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = s
                    .get(i + 1..i + 3)
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_our_own_address_is_a_host() {
        let lo: SocketAddr = "127.0.0.1:8081".parse().unwrap();
        assert!(host_names("127.0.0.1:8081", lo));
        assert!(host_names("localhost:8081", lo));
        assert!(host_names("LOCALHOST:8081", lo));
        assert!(!host_names("127.0.0.1:8082", lo), "another port");
        assert!(!host_names("127.0.0.1", lo), "port 80 implied");
        assert!(!host_names("evil.example:8081", lo), "a rebound name");
        assert!(!host_names("127.0.0.2:8081", lo));
        assert!(!host_names("", lo));
        let any: SocketAddr = "0.0.0.0:8081".parse().unwrap();
        assert!(host_names("192.0.2.7:8081", any));
        assert!(!host_names("shop.example:8081", any));
        let v6: SocketAddr = "[::1]:8081".parse().unwrap();
        assert!(host_names("[::1]:8081", v6));
        assert!(host_names("localhost:8081", v6));
        assert!(!host_names("[::2]:8081", v6));
        let private: SocketAddr = "10.0.0.5:80".parse().unwrap();
        assert!(host_names("10.0.0.5", private));
        assert!(!host_names("localhost", private), "not on loopback");
    }

    #[test]
    fn forms_decode() {
        let f = parse_form("token=ab%2Fc+d&token=second&x");
        assert_eq!(f.get("token").map(String::as_str), Some("ab/c d"));
        assert_eq!(f.get("x").map(String::as_str), Some(""));
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
        assert_eq!(percent_decode("%C3%A9"), "é");
    }
}
