//! `app-server-agent demo-shop`: a small demo web service to try the agent with (the docker
//! compose topology runs one beside each agent). Its page is the service URL the agent gives
//! clients: `GET /?token=…` verifies the token with the agent (`POST /introspect`) and sells
//! the visitor one item (`POST /sessions/{id}/charges`, the session id and the item as the
//! idempotency key, so a reload buys nothing twice), then says what the agent answered.
//! `GET /healthz` answers `ok`. A web shop of a real vendor does the same two calls.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{Value, json};

use crate::cli::DemoShopArgs;

/// Largest answer read from the agent.
const MAX_ANSWER: usize = 64 * 1024;

struct Shop {
    args: DemoShopArgs,
    /// `host:port` of the agent's HTTP API.
    agent: String,
}

/// Serves the shop until Ctrl-C or SIGTERM.
pub(crate) async fn run(args: DemoShopArgs) -> anyhow::Result<()> {
    let agent = args
        .agent
        .strip_prefix("http://")
        .ok_or_else(|| anyhow::anyhow!("--agent must be http://IP:PORT (the agent's --http)"))?
        .trim_end_matches('/')
        .to_string();
    agent
        .parse::<SocketAddr>()
        .map_err(|_| anyhow::anyhow!("--agent must be http://IP:PORT, not {:?}", args.agent))?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {} (--listen): {e}", args.listen))?;
    println!(
        "demo shop on http://{}/ selling {} for {} (agent {})",
        listener.local_addr()?,
        args.item,
        proto::service::format_money(args.price, &args.currency),
        args.agent
    );
    let shop = Arc::new(Shop { args, agent });
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = crate::signals::stop() => return Ok(()),
        };
        let shop = shop.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let shop = shop.clone();
                async move { Ok::<_, Infallible>(shop.page(&req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

impl Shop {
    async fn page<B>(&self, req: &Request<B>) -> Response<Full<Bytes>> {
        if req.method() != Method::GET {
            return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into());
        }
        if req.uri().path() == "/healthz" {
            return text(StatusCode::OK, "ok\n".into());
        }
        let token = req.uri().query().and_then(|q| {
            q.split('&')
                .find_map(|p| p.strip_prefix("token="))
                .map(str::to_string)
        });
        let Some(token) = token.filter(|t| !t.is_empty()) else {
            return text(
                StatusCode::BAD_REQUEST,
                "open a session with the relay first: this page needs its token=\n".into(),
            );
        };
        match self.sell(&token).await {
            Ok(line) => text(StatusCode::OK, line),
            Err((status, why)) => text(status, format!("{why}\n")),
        }
    }

    async fn sell(&self, token: &str) -> Result<String, (StatusCode, String)> {
        let bad = |e: String| (StatusCode::BAD_GATEWAY, e);
        let seen = self
            .post("/introspect", json!({ "token": token }))
            .await
            .map_err(bad)?;
        if seen["active"] != true {
            return Err((
                StatusCode::FORBIDDEN,
                "this token is not a live session".into(),
            ));
        }
        let sid = seen["sid"].as_str().unwrap_or_default().to_string();
        let user = seen["username"].as_str().unwrap_or("you").to_string();
        let item_id = self
            .args
            .item
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect::<String>();
        let charge = json!({"charges": [{
            "idempotency_key": format!("{sid}-{item_id}"),
            "item_id": item_id,
            "item_name": self.args.item,
            "unit_price_minor": self.args.price,
            "quantity": 1,
            "currency": self.args.currency,
        }]});
        let answer = self
            .post(&format!("/sessions/{sid}/charges"), charge)
            .await
            .map_err(bad)?;
        let outcome = answer["results"][0]["outcome"]
            .as_str()
            .unwrap_or("unknown")
            .to_string();
        Ok(format!(
            "{user} bought {} for {} (session {sid}): {outcome}\n",
            self.args.item,
            proto::service::format_money(self.args.price, &self.args.currency),
        ))
    }

    /// POSTs JSON to the agent's HTTP API; its JSON answer.
    async fn post(&self, path: &str, body: Value) -> Result<Value, String> {
        let stream = tokio::net::TcpStream::connect(self.agent.as_str())
            .await
            .map_err(|e| format!("cannot reach the agent at {}: {e}", self.agent))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("HTTP with the agent failed: {e}"))?;
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        let result = async {
            let mut req = Request::builder()
                .method(Method::POST)
                .uri(path)
                .header(HOST, self.agent.as_str())
                .header(CONTENT_TYPE, "application/json");
            if let Some(t) = &self.args.agent_token {
                req = req.header(AUTHORIZATION, format!("Bearer {t}"));
            }
            let req = req
                .body(Full::new(Bytes::from(body.to_string())))
                .map_err(|e| format!("cannot build the request: {e}"))?;
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| format!("the agent did not answer: {e}"))?;
            let bytes = Limited::new(resp.into_body(), MAX_ANSWER)
                .collect()
                .await
                .map_err(|e| format!("reading the agent's answer failed: {e}"))?
                .to_bytes();
            serde_json::from_slice(&bytes)
                .map_err(|e| format!("the agent's answer is not JSON: {e}"))
        }
        .await;
        driver.abort();
        result
    }
}
