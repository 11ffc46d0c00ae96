//! What the relay calls itself on the wire: its domain and the address it puts in Via and
//! Record-Route, and how it recognises a URI naming itself. Plain data, fixed once the transport
//! is bound; no I/O.

use proto::sip::message::{Request, Transport, Uri, Via};
use std::net::{IpAddr, SocketAddr};

#[derive(Debug, Clone)]
pub struct Identity {
    /// The SIP domain served (`--domain`).
    pub domain: String,
    /// Host (IP literal) and port the relay puts in Via and Record-Route.
    pub advertised: SocketAddr,
    /// The address the transport is bound to (possibly unspecified).
    pub bound: SocketAddr,
}

impl Identity {
    /// Whether a URI host names this relay: its domain (any port), or its own address and port.
    pub fn is_local_host(&self, host_key: &str, port: Option<u16>) -> bool {
        if host_key.eq_ignore_ascii_case(&self.domain) {
            return true;
        }
        if port.unwrap_or(5060) != self.advertised.port() {
            return false;
        }
        match host_key.parse::<IpAddr>() {
            Ok(ip) => {
                ip == self.advertised.ip()
                    || ip == self.bound.ip()
                    || (self.bound.ip().is_unspecified() && ip.is_loopback())
            }
            Err(_) => false,
        }
    }

    /// Whether a Route/Record-Route URI names this relay.
    pub fn is_self_uri(&self, uri: &Uri) -> bool {
        self.is_local_host(&uri.host_key(), uri.port)
    }

    /// Whether a Via is one the relay put on (its advertised address and port).
    pub fn is_own_via(&self, via: &Via) -> bool {
        let host = via.host.trim_start_matches('[').trim_end_matches(']');
        host.parse::<IpAddr>()
            .is_ok_and(|ip| ip == self.advertised.ip())
            && via.port.unwrap_or(5060) == self.advertised.port()
    }

    /// The relay's Via (with `rport`), as text.
    pub fn via(&self, transport: Transport, branch: &str) -> String {
        let mut via = Via::new(
            transport,
            &self.advertised.ip().to_string(),
            Some(self.advertised.port()),
            branch,
        );
        via.set_param("rport", None);
        via.to_string()
    }

    /// Puts the relay's Via on top of a request.
    pub fn push_via(&self, req: &mut Request, transport: Transport, branch: &str) {
        req.headers.push_front("Via", self.via(transport, branch));
    }

    /// The relay's Record-Route entry for one side of a call.
    pub fn record_route(&self, transport: Transport) -> String {
        let ip = self.advertised.ip();
        let host = if ip.is_ipv6() {
            format!("[{ip}]")
        } else {
            ip.to_string()
        };
        match transport {
            Transport::Udp => format!("<sip:{host}:{};lr>", self.advertised.port()),
            other => format!(
                "<sip:{host}:{};transport={};lr>",
                self.advertised.port(),
                other.as_str().to_ascii_lowercase()
            ),
        }
    }

    /// Removes the Route headers at the top that name the relay (loose routing, RFC 3261 §16.4).
    pub fn pop_self_routes(&self, req: &mut Request) {
        while let Some(first) = req.headers.get("Route") {
            match proto::sip::message::NameAddr::parse(first) {
                Ok(na) if self.is_self_uri(&na.uri) => {
                    req.headers.remove_first("Route");
                }
                _ => break,
            }
        }
    }
}
