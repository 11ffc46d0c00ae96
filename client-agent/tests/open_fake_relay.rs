//! `open` against a hand-driven fake relay on a UDP socket: the agent's side of forked 2xx,
//! ACKs, keepalives, closing and charges, and the words of failures. (The end-to-end tests with
//! the real relay and application servers live in the `tests` crate.)
#![allow(clippy::unwrap_used)] // test helpers: a failed unwrap is a failed test

use bytes::Bytes;
use client_agent::agent::{Input, run_with_input};
use client_agent::cli::Cli;
use client_agent::output::{Charge, ClosedBy, Event, Output};
use proto::service::{
    CHARGE_HEADER, SERVICE_ACCESS_TYPE, SERVICE_REQUEST_TYPE, ServiceAccess, ServiceRequest,
};
use proto::sip::message::{self, Limits, Message, Method, Request, Response};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

const SECS: Duration = Duration::from_secs(5);

struct FakeRelay {
    sock: UdpSocket,
}

impl FakeRelay {
    async fn new() -> FakeRelay {
        FakeRelay {
            sock: UdpSocket::bind("127.0.0.1:0").await.unwrap(),
        }
    }

    fn addr(&self) -> SocketAddr {
        self.sock.local_addr().unwrap()
    }

    async fn recv(&self) -> (Message, SocketAddr) {
        let mut buf = vec![0u8; 65_536];
        let (n, from) = tokio::time::timeout(SECS, self.sock.recv_from(&mut buf))
            .await
            .expect("a message from the agent")
            .unwrap();
        (message::parse(&buf[..n], &Limits::UDP).unwrap(), from)
    }

    /// The next request of that method (others, and responses, are skipped).
    async fn request(&self, method: Method) -> (Request, SocketAddr) {
        loop {
            if let (Message::Request(r), from) = self.recv().await {
                if r.method == method {
                    return (r, from);
                }
            }
        }
    }

    async fn response(&self) -> Response {
        loop {
            if let (Message::Response(r), _) = self.recv().await {
                return r;
            }
        }
    }

    async fn send(&self, msg: Message, to: SocketAddr) {
        self.sock
            .send_to(&message::serialize(&msg), to)
            .await
            .unwrap();
    }

    /// A 2xx from an application server with To tag `tag`, record-routed through us.
    fn ok(&self, invite: &Request, tag: &str) -> Response {
        let mut ok = message::make_response(invite, 200, None, Some(tag));
        ok.headers
            .push("Record-Route", format!("<sip:{};lr>", self.addr()));
        ok.headers
            .push("Contact", format!("<sip:{tag}@127.0.0.1:9>"));
        ok
    }

    /// A request in the dialog of the 2xx with To tag `tag` (from the server, through us).
    fn in_dialog(&self, method: Method, invite: &Request, tag: &str, local_tag: &str) -> Request {
        let text = format!(
            "{method} {uri} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch={branch}\r\nMax-Forwards: 70\r\n\
             From: <sip:wine@relay.test>;tag={tag}\r\nTo: <sip:alice@relay.test>;tag={local_tag}\r\n\
             Call-ID: {call_id}\r\nCSeq: 7 {method}\r\nContent-Length: 0\r\n\r\n",
            uri = "sip:alice@127.0.0.1",
            me = self.addr(),
            branch = message::new_branch(),
            call_id = invite.call_id().unwrap(),
        );
        match message::parse(text.as_bytes(), &Limits::UDP).unwrap() {
            Message::Request(r) => r,
            Message::Response(_) => unreachable!(),
        }
    }
}

struct Run {
    events: mpsc::UnboundedReceiver<Event>,
    commands: mpsc::UnboundedSender<String>,
    task: JoinHandle<anyhow::Result<ExitCode>>,
}

impl Run {
    fn start(relay: SocketAddr, args: &[&str]) -> Run {
        let relay = relay.to_string();
        let mut argv = vec![
            "client-agent",
            "--relay",
            &relay,
            "--user",
            "alice",
            "--password",
            "alice-pw",
            "--domain",
            "relay.test",
        ];
        argv.extend_from_slice(args);
        let cli = Cli::try_parse_from_args(&argv).unwrap();
        let (tx, events) = mpsc::unbounded_channel();
        let (commands, input) = mpsc::unbounded_channel();
        let out = Output {
            json: true,
            sink: Some(tx),
        };
        let task = tokio::spawn(run_with_input(cli, out, Input::Lines(input)));
        Run {
            events,
            commands,
            task,
        }
    }

    /// The next event, notes (what the agent is doing) skipped.
    async fn event(&mut self) -> Event {
        loop {
            let ev = tokio::time::timeout(SECS, self.events.recv())
                .await
                .expect("an event")
                .expect("the agent is running");
            if !matches!(ev, Event::Note { .. }) {
                return ev;
            }
        }
    }

    async fn exit(self) -> ExitCode {
        tokio::time::timeout(SECS, self.task)
            .await
            .expect("the agent ends")
            .unwrap()
            .unwrap()
    }
}

fn tag_of(to: &str) -> String {
    message::NameAddr::parse(to)
        .unwrap()
        .tag()
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn forked_sessions_are_acked_kept_alive_and_closed_with_their_charge() {
    let relay = FakeRelay::new().await;
    let mut run = Run::start(relay.addr(), &["open", "wine", "--detail", "red, 2015"]);

    let (invite, client) = relay.request(Method::Invite).await;
    assert_eq!(invite.uri.to_string(), "sip:wine@relay.test");
    assert_eq!(
        invite.headers.get("Content-Type"),
        Some(SERVICE_REQUEST_TYPE)
    );
    assert_eq!(
        ServiceRequest::parse(&invite.body).unwrap().detail(),
        Some("red, 2015")
    );
    let local_tag = tag_of(invite.headers.get("From").unwrap());

    // First server: the access in the body.
    let mut ok1 = relay.ok(&invite, "s1");
    ok1.headers.push("Content-Type", SERVICE_ACCESS_TYPE);
    ok1.body = Bytes::from(
        ServiceAccess {
            url: "https://a.test/s?t=1".into(),
            service: "wine".into(),
            session_id: "sid-1".into(),
            server: "vendor-a".into(),
        }
        .to_json(),
    );
    relay.send(Message::Response(ok1.clone()), client).await;
    let (ack, _) = relay.request(Method::Ack).await;
    assert_eq!(tag_of(ack.headers.get("To").unwrap()), "s1");
    assert_eq!(ack.uri.to_string(), "sip:s1@127.0.0.1:9");
    assert_eq!(
        ack.headers.get("Route"),
        Some(format!("<sip:{};lr>", relay.addr()).as_str())
    );
    assert_eq!(
        run.event().await,
        Event::Session {
            index: 1,
            transferred_from: None,
            service: "wine".into(),
            server: Some("vendor-a".into()),
            session_id: Some("sid-1".into()),
            url: Some("https://a.test/s?t=1".into()),
        }
    );

    // Second server, later: the URL in Call-Info.
    let mut ok2 = relay.ok(&invite, "s2");
    ok2.headers
        .push("Call-Info", "<https://b.test/x>;purpose=info");
    relay.send(Message::Response(ok2), client).await;
    let (ack, _) = relay.request(Method::Ack).await;
    assert_eq!(tag_of(ack.headers.get("To").unwrap()), "s2");
    assert_eq!(
        run.event().await,
        Event::Session {
            index: 2,
            transferred_from: None,
            service: "wine".into(),
            server: None,
            session_id: None,
            url: Some("https://b.test/x".into()),
        }
    );

    // A retransmitted 2xx: ACKed again, no new session.
    relay.send(Message::Response(ok1), client).await;
    let (ack, _) = relay.request(Method::Ack).await;
    assert_eq!(tag_of(ack.headers.get("To").unwrap()), "s1");

    // Keepalives: 200 in a live dialog, 481 in an unknown one.
    let options = relay.in_dialog(Method::Options, &invite, "s1", &local_tag);
    relay.send(Message::Request(options), client).await;
    assert_eq!(relay.response().await.status, 200);
    let options = relay.in_dialog(Method::Options, &invite, "s9", &local_tag);
    relay.send(Message::Request(options), client).await;
    assert_eq!(relay.response().await.status, 481);

    run.commands.send("list".into()).unwrap();
    match run.event().await {
        Event::Sessions { sessions } => {
            let idx: Vec<_> = sessions.iter().map(|s| s.index).collect();
            assert_eq!(idx, [1, 2]);
        }
        other => panic!("expected the list, got {other:?}"),
    }

    // `close 1`: BYE through the relay, charge in the 200.
    run.commands.send("close 1".into()).unwrap();
    let (bye, from) = relay.request(Method::Bye).await;
    assert_eq!(tag_of(bye.headers.get("To").unwrap()), "s1");
    assert_eq!(bye.uri.to_string(), "sip:s1@127.0.0.1:9");
    let mut ok = message::make_response(&bye, 200, None, None);
    ok.headers.push(
        CHARGE_HEADER,
        "amount=20;currency=EUR;duration-ms=12345;billed-secs=13;session=sid-1",
    );
    relay.send(Message::Response(ok), from).await;
    assert_eq!(
        run.event().await,
        Event::Closed {
            index: 1,
            by: ClosedBy::Client,
            duration_ms: 12_345,
            items: vec![],
            charge: Some(Charge {
                amount_minor: 20,
                currency: "EUR".into(),
                billed_secs: 13,
            }),
            session_id: Some("sid-1".into()),
            status: Some(200),
            reason: None,
        }
    );

    // The second server hangs up; the relay's copy of its BYE carries the charge.
    let mut bye = relay.in_dialog(Method::Bye, &invite, "s2", &local_tag);
    bye.headers.push(
        CHARGE_HEADER,
        "amount=5;currency=EUR;duration-ms=2000;billed-secs=2;session=sid-2",
    );
    relay.send(Message::Request(bye), client).await;
    assert_eq!(relay.response().await.status, 200);
    assert_eq!(
        run.event().await,
        Event::Closed {
            index: 2,
            by: ClosedBy::Server,
            duration_ms: 2_000,
            items: vec![],
            charge: Some(Charge {
                amount_minor: 5,
                currency: "EUR".into(),
                billed_secs: 2,
            }),
            session_id: Some("sid-2".into()),
            status: None,
            reason: None,
        }
    );

    // No session left: forks still pending are cancelled, and the agent ends.
    let (cancel, from) = relay.request(Method::Cancel).await;
    relay
        .send(
            Message::Response(message::make_response(&cancel, 200, None, None)),
            from,
        )
        .await;
    assert_eq!(run.exit().await, ExitCode::SUCCESS);
}

#[tokio::test]
async fn for_elapsing_closes_every_session() {
    let relay = FakeRelay::new().await;
    let mut run = Run::start(relay.addr(), &["open", "wine", "--for", "300ms"]);
    let (invite, client) = relay.request(Method::Invite).await;
    assert!(invite.body.is_empty());
    assert_eq!(invite.headers.get("Content-Type"), None);
    relay
        .send(Message::Response(relay.ok(&invite, "s1")), client)
        .await;
    assert!(matches!(
        run.event().await,
        Event::Session {
            index: 1,
            transferred_from: None,
            url: None,
            ..
        }
    ));
    // The BYE comes by itself; the relay reports no charge, then ignores the BYE's CANCEL.
    let (bye, from) = relay.request(Method::Bye).await;
    relay
        .send(
            Message::Response(message::make_response(&bye, 200, None, None)),
            from,
        )
        .await;
    match run.event().await {
        Event::Closed {
            index: 1,
            by: ClosedBy::Client,
            charge: None,
            session_id: None,
            status: Some(200),
            ..
        } => {}
        other => panic!("expected closed, got {other:?}"),
    }
    assert_eq!(run.exit().await, ExitCode::SUCCESS);
}

async fn failure(status: u16, reason: &str, extra: &[(&str, &str)]) -> (Event, ExitCode) {
    let relay = FakeRelay::new().await;
    let mut run = Run::start(relay.addr(), &["open", "wine"]);
    let (invite, client) = relay.request(Method::Invite).await;
    let mut resp = message::make_response(&invite, status, Some(reason), Some("x"));
    for (n, v) in extra {
        resp.headers.push(n, *v);
    }
    relay.send(Message::Response(resp), client).await;
    let ev = run.event().await;
    (ev, run.exit().await)
}

#[tokio::test]
async fn failures_are_told_in_words() {
    let (ev, code) = failure(404, "Not Found", &[]).await;
    assert_eq!(
        ev,
        Event::Failed {
            request: "INVITE".into(),
            status: 404,
            reason: "Not Found".into(),
            retry_after: None,
            message: "no such service: wine (404 Not Found)".into(),
        }
    );
    assert_ne!(code, ExitCode::SUCCESS);
    let (ev, _) = failure(486, "Busy Here", &[("Retry-After", "30")]).await;
    match ev {
        Event::Failed {
            retry_after,
            message,
            ..
        } => {
            assert_eq!(retry_after, Some(30));
            assert_eq!(
                message,
                "the server is busy; try again in 30 s (486 Busy Here)"
            );
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_second_challenge_means_wrong_credentials() {
    let relay = FakeRelay::new().await;
    let mut run = Run::start(relay.addr(), &["open", "wine"]);
    let challenge = "Digest realm=\"relay.test\", nonce=\"n1\", qop=\"auth\", algorithm=MD5";
    let (invite, client) = relay.request(Method::Invite).await;
    assert!(invite.headers.get("Proxy-Authorization").is_none());
    let mut resp = message::make_response(&invite, 407, None, Some("x"));
    resp.headers.push("Proxy-Authenticate", challenge);
    relay.send(Message::Response(resp), client).await;
    let (invite, client) = relay.request(Method::Invite).await;
    let creds = invite.headers.get("Proxy-Authorization").unwrap();
    assert!(creds.contains("username=\"alice\""), "{creds}");
    let mut resp = message::make_response(&invite, 407, None, Some("y"));
    resp.headers.push("Proxy-Authenticate", challenge);
    relay.send(Message::Response(resp), client).await;
    match run.event().await {
        Event::Failed {
            status: 407,
            message,
            ..
        } => assert_eq!(
            message,
            "wrong user name or password (407 Proxy Authentication Required)"
        ),
        other => panic!("{other:?}"),
    }
    assert_ne!(run.exit().await, ExitCode::SUCCESS);
}
