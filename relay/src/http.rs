//! # http: the operator's endpoint (`--http ADDR`)
//!
//! - `GET /metrics`: every metric ([`crate::metrics`]) in Prometheus' text format (0.0.4),
//!   the gauges taken from the relay's tables at that moment.
//! - `GET /healthz`: 200 `ok` while the process serves (liveness).
//! - `GET /readyz`: 200 `ready` when the database answers within 2 s and the SIP transport is
//!   bound and taking new calls; 503 naming what is not (a planned stop, an unreachable
//!   database) otherwise (readiness: a load balancer stops sending new calls).
//!
//! Anything else is 404, another method 405. No authentication: bind it to loopback or a
//! management network. Only this module and the gRPC endpoint (`api`) serve HTTP.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use crate::core::Core;
use crate::metrics::METRICS;

/// Most connections served at once; more are closed at accept.
const MAX_CONNECTIONS: usize = 64;

/// Binds `addr` (the error names it).
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen for HTTP (--http) on {addr}: {e}"))
}

/// Serves until the task is aborted.
pub async fn serve(listener: TcpListener, core: Arc<Core>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    if conns.len() >= MAX_CONNECTIONS {
                        continue;
                    }
                    let core = core.clone();
                    conns.spawn(async move {
                        let service = hyper::service::service_fn(move |req| {
                            let core = core.clone();
                            async move { Ok::<_, Infallible>(handle(&core, &req).await) }
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

fn answer(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

const TEXT: &str = "text/plain; charset=utf-8";

async fn handle<B>(core: &Arc<Core>, req: &Request<B>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    if !matches!(path, "/metrics" | "/healthz" | "/readyz") {
        return answer(StatusCode::NOT_FOUND, TEXT, "not found\n".into());
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut resp = answer(StatusCode::METHOD_NOT_ALLOWED, TEXT, "GET only\n".into());
        resp.headers_mut()
            .insert(hyper::header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return resp;
    }
    match path {
        "/metrics" => answer(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            scrape(core).await,
        ),
        "/healthz" => answer(StatusCode::OK, TEXT, "ok\n".into()),
        _ => match ready(core).await {
            Ok(()) => answer(StatusCode::OK, TEXT, "ready\n".into()),
            Err(why) => answer(StatusCode::SERVICE_UNAVAILABLE, TEXT, format!("{why}\n")),
        },
    }
}

/// Why the relay should get no new calls now, if so.
async fn ready(core: &Arc<Core>) -> Result<(), String> {
    if core.is_stopping() {
        return Err("stopping: new calls are refused (planned stop)".into());
    }
    match tokio::time::timeout(Duration::from_secs(2), core.store.ping()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("the database does not answer: {e}")),
        Err(_) => Err("the database does not answer within 2 s".into()),
    }
}

/// The gauges from the relay's tables, then every metric as text.
async fn scrape(core: &Arc<Core>) -> String {
    let m = &*METRICS;
    m.transactions.set(gauge(core.live_contexts()));
    m.dialogs.set(gauge(core.sessions.live()));
    m.sessions_open
        .set(gauge(core.sessions.established_count()));
    m.store_queue.set(gauge(core.sessions.queued()));
    m.tcp_connections.set(gauge(core.transport.connections()));
    m.watches.set(gauge(core.watches.len()));
    if let Ok(Ok(n)) = tokio::time::timeout(
        Duration::from_secs(2),
        core.store.count_bindings(proto::clock::now_ms()),
    )
    .await
    {
        m.bindings.set(n);
    }
    let dropped = core.transport.dropped_total();
    let counted = m.flood_dropped.get();
    if dropped > counted {
        m.flood_dropped.inc_by(dropped - counted);
    }
    m.encode()
}

fn gauge(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}
