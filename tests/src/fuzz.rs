//! The bodies of the fuzz targets (`fuzz/fuzz_targets/*.rs`, run by `cargo xtask fuzz`), also
//! used by the ordinary test that replays every input that once crashed or hung
//! (`fuzz/regressions/TARGET/*`, `tests/tests/fuzz_regressions.rs`). Each takes arbitrary bytes
//! and must neither panic nor hang.

use proto::sip::digest::{self, Algorithm};
use proto::sip::message::{self, Limits, Message};
use proto::transport::{SipTransport, Target};
use std::sync::{Arc, OnceLock};

/// A target's body: arbitrary bytes in, no panic, no hang.
pub type Body = fn(&[u8]);

/// The targets, by name (the file names under `fuzz/fuzz_targets/` and `fuzz/regressions/`).
pub const TARGETS: [(&str, Body); 4] = [
    ("message", message),
    ("digest", digest_headers),
    ("service_bodies", service_bodies),
    ("relay_datagram", relay_datagram),
];

/// The SIP message parser, and what the relay does with a parsed message's fields: every
/// header it reads, serialising it again, and parsing what it serialised.
pub fn message(data: &[u8]) {
    let Ok(msg) = message::parse(data, &Limits::UDP) else {
        return;
    };
    let _ = msg.call_id();
    let _ = msg.cseq();
    let _ = msg.top_via();
    let _ = message::contacts(msg.headers());
    for name in ["From", "To", "Route", "Record-Route"] {
        let _ = message::name_addr_header(msg.headers(), name);
    }
    if let Message::Request(req) = &msg {
        let _ = req.uri.host_key();
        let _ = req.uri.transport();
        let _ = message::make_response(req, 400, None, Some("tag"));
    }
    let bytes = message::serialize(&msg);
    // What we write, we must read back.
    if let Err(e) = message::parse(&bytes, &Limits::UDP) {
        panic!(
            "re-parsing our own serialisation failed ({} {}): {:?}",
            e.status,
            e.reason,
            String::from_utf8_lossy(&bytes)
        );
    }
}

/// The digest header parsers (credentials and challenges) and checking an answer.
pub fn digest_headers(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(creds) = digest::Credentials::parse(text) {
        let ha1 = digest::ha1(creds.algorithm, &creds.username, &creds.realm, "pw");
        let _ = digest::verify(&creds, &ha1, "REGISTER");
    }
    if let Ok(ch) = digest::Challenge::parse(text) {
        let _ = ch.to_header_value();
        let _ = digest::answer(&ch, "alice", "pw", "INVITE", "sip:bob@relay.test", 1, "c");
    }
    let key = digest::NonceKey::new([1; 32]);
    let _ = key.check(text, 1_000, 300);
    let _ = digest::ha1(Algorithm::Sha256, text, text, text);
}

/// The service bodies and headers the programs exchange: service request, service access,
/// the relay's assertion, the charge header.
pub fn service_bodies(data: &[u8]) {
    let _ = proto::service::ServiceRequest::parse(data);
    let _ = proto::service::ServiceAccess::parse(data);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = proto::service::Assertion::verify(text, &[3; 32], 1_000);
        if let Some(c) = proto::service::ChargeSummary::parse(text) {
            let _ = proto::service::ChargeSummary::parse(&c.to_header());
        }
    }
}

struct FuzzRelay {
    runtime: tokio::runtime::Runtime,
    transport: Arc<SipTransport>,
    _handle: relay::serve::RelayHandle,
}

/// One relay for the whole fuzzing process: in-memory SQLite, loopback, no per-source limit.
fn fuzz_relay() -> &'static FuzzRelay {
    static RELAY: OnceLock<FuzzRelay> = OnceLock::new();
    RELAY.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime for the fuzzed relay");
        let config = relay::config::Config {
            sip: "127.0.0.1:0".parse().expect("literal address"),
            domain: "relay.test".into(),
            database_url: "sqlite::memory:".into(),
            source_rate_per_sec: 0,
            timer_t1_ms: 50,
            ..relay::config::Config::default()
        };
        let handle = runtime
            .block_on(relay::serve::start(config))
            .expect("the fuzzed relay starts");
        FuzzRelay {
            transport: handle.core.transport.clone(),
            runtime,
            _handle: handle,
        }
    })
}

/// The relay's handling of one received datagram, from the transport's parser through the
/// dispatcher, the screen and whatever context the datagram starts. Answers go to the source
/// (127.0.0.1, a port nothing listens on) or to what its Via names on 127.0.0.1: loopback
/// only, as the transport stamps `received` with the source address.
pub fn relay_datagram(data: &[u8]) {
    let r = fuzz_relay();
    let source = Target::udp(std::net::SocketAddr::from(([127, 0, 0, 1], 9)));
    r.runtime.block_on(async {
        r.transport.receive(data, source).await;
        // Let the dispatcher and the contexts it started run.
        for _ in 0..32 {
            tokio::task::yield_now().await;
        }
    });
}

/// Replays every file under `dir/TARGET/` through its target; returns how many ran.
pub fn replay_all(dir: &std::path::Path) -> anyhow::Result<usize> {
    let mut ran = 0;
    for (name, body) in TARGETS {
        let target_dir = dir.join(name);
        let Ok(entries) = std::fs::read_dir(&target_dir) else {
            continue;
        };
        let mut files: Vec<_> = entries.filter_map(Result::ok).map(|e| e.path()).collect();
        files.sort();
        let hidden = |f: &std::path::Path| {
            f.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        };
        for file in files.iter().filter(|f| f.is_file() && !hidden(f)) {
            let data = std::fs::read(file)?;
            eprintln!("replaying {}", file.display());
            body(&data);
            ran += 1;
        }
    }
    Ok(ran)
}
