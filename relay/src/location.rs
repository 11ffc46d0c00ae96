//! The location service: where a user's devices are reached. Bindings live in the store
//! (written by [`crate::registrar`]); each keeps the source its REGISTER came from, and that
//! source, never the Contact, is where the device is reached.

use crate::cache::TtlCache;
use crate::store::{Binding, Store, StoreError};
use proto::sip::message::Transport as ViaTransport;
use proto::transport::{SipTransport, Target};
use std::net::SocketAddr;

/// The location service: bindings by address of record, read through a short-lived cache that
/// this relay's own REGISTERs invalidate at once.
#[derive(Debug)]
pub struct Location {
    cache: TtlCache<String, Vec<Binding>>,
}

impl Location {
    pub fn new(ttl: std::time::Duration) -> Location {
        Location {
            cache: TtlCache::new(ttl, 100_000),
        }
    }

    /// The unexpired bindings of `aor`, highest q first.
    pub async fn lookup(
        &self,
        store: &Store,
        aor: &str,
        now_ms: i64,
    ) -> Result<Vec<Binding>, StoreError> {
        let now = std::time::Instant::now();
        let key = aor.to_string();
        let bindings = match self.cache.get(&key, now) {
            Some(hit) => hit,
            None => {
                let found = store.bindings(aor, now_ms).await?;
                self.cache.put(key, found.clone(), now);
                found
            }
        };
        Ok(bindings
            .into_iter()
            .filter(|b| b.expires_at_ms > now_ms)
            .collect())
    }

    pub fn invalidate(&self, aor: &str) {
        self.cache.invalidate(&aor.to_string());
    }
}

/// Where to send requests for a binding: where its REGISTER came from, over the transport it
/// came on. Over UDP that is the packet's source address (which also gets through a NAT); over
/// TCP the very connection, while it is open, and nothing once it closed (the device
/// registers again over a new one). Never the host the Contact names: an account could name
/// anyone there.
pub fn binding_target(transport: &SipTransport, b: &Binding) -> Option<Target> {
    let src = parse_source(&b.source)?;
    match src.transport {
        ViaTransport::Udp => Some(src),
        ViaTransport::Tcp => transport.connection_to(src.addr).map(|id| Target {
            conn: Some(id),
            ..src
        }),
        _ => None,
    }
}

pub fn parse_source(s: &str) -> Option<Target> {
    let (proto, addr) = s.split_once(':')?;
    let addr: SocketAddr = addr.parse().ok()?;
    match proto {
        "udp" => Some(Target::udp(addr)),
        "tcp" => Some(Target::tcp(addr)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_round_trip() {
        let t = parse_source("tcp:127.0.0.1:5070").unwrap();
        assert_eq!(t.transport, ViaTransport::Tcp);
        assert_eq!(t.addr, "127.0.0.1:5070".parse().unwrap());
        assert!(parse_source("sctp:1.2.3.4:1").is_none());
        assert!(parse_source("garbage").is_none());
    }
}
