//! The SDP the programs exchange (RFC 4566, RFC 3264): softphones and SIPp want a body even
//! though no media flows (see `shared/notes/real-clients.md`).
//!
//! [`offer`]: one inactive PCMU audio stream. [`answer`]: one answer line per offered stream,
//! the first with the same media type and first payload type as offered, `a=inactive`; the
//! others refused with port 0 (RFC 3264 §6).
//!
//! Pure text in, text out: does not open media ports.

use std::net::IpAddr;

/// An offer of one inactive audio stream (PCMU) from `ip`; no media is sent.
pub fn offer(ip: IpAddr, session_id: u64) -> String {
    let (family, addr) = match ip {
        IpAddr::V4(a) => ("IP4", a.to_string()),
        IpAddr::V6(a) => ("IP6", a.to_string()),
    };
    format!(
        "v=0\r\no=- {session_id} {session_id} IN {family} {addr}\r\ns=sip-relay\r\nc=IN {family} {addr}\r\nt=0 0\r\nm=audio 9 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\na=inactive\r\n"
    )
}

/// Whether a Content-Type names SDP.
pub fn is_sdp(content_type: Option<&str>) -> bool {
    crate::sip::message::is_media_type(content_type, "application/sdp")
}

/// The answer to `offer` from `ip`, or `None` when the offer has no usable `m=` line.
pub fn answer(offer: &[u8], ip: IpAddr, session_id: u64) -> Option<String> {
    let text = std::str::from_utf8(offer).ok()?;
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    if !lines.iter().any(|l| l.starts_with("v=")) {
        return None;
    }
    let (family, addr) = match ip {
        IpAddr::V4(a) => ("IP4", a.to_string()),
        IpAddr::V6(a) => ("IP6", a.to_string()),
    };
    let mut out = format!(
        "v=0\r\no=- {session_id} {session_id} IN {family} {addr}\r\ns=sip-relay\r\nc=IN {family} {addr}\r\nt=0 0\r\n"
    );
    let mut streams = 0;
    let mut i = 0;
    while i < lines.len() {
        let Some(m) = lines[i].strip_prefix("m=") else {
            i += 1;
            continue;
        };
        let mut parts = m.split_whitespace();
        let (Some(media), Some(_port), Some(proto), Some(fmt)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return None;
        };
        if !is_token(media) || !is_token(proto) || !is_token(fmt) {
            return None;
        }
        let end = lines[i + 1..]
            .iter()
            .position(|l| l.starts_with("m="))
            .map_or(lines.len(), |p| i + 1 + p);
        if streams == 0 {
            out.push_str(&format!("m={media} 9 {proto} {fmt}\r\n"));
            // Keep the offer's description of that payload type.
            for attr in &lines[i + 1..end] {
                for name in ["a=rtpmap:", "a=fmtp:"] {
                    if attr
                        .strip_prefix(name)
                        .and_then(|rest| rest.split_whitespace().next())
                        == Some(fmt)
                        && attr.chars().all(|c| !c.is_control())
                    {
                        out.push_str(attr);
                        out.push_str("\r\n");
                    }
                }
            }
            out.push_str("a=inactive\r\n");
        } else {
            out.push_str(&format!("m={media} 0 {proto} {fmt}\r\n"));
        }
        streams += 1;
        i = end;
    }
    (streams > 0).then_some(out)
}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | '-' | '_' | '.' | '+'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_offer_is_answered_inactive_in_kind() {
        let ip: IpAddr = "127.0.0.1".parse().unwrap_or(IpAddr::from([127, 0, 0, 1]));
        let offer = offer(ip, 7);
        assert!(offer.contains("m=audio 9 RTP/AVP 0\r\n"), "{offer}");
        assert!(offer.contains("c=IN IP4 127.0.0.1"), "{offer}");
        let answer = answer(offer.as_bytes(), ip, 8).unwrap_or_default();
        assert!(answer.contains("m=audio 9 RTP/AVP 0"), "{answer}");
        assert!(answer.contains("a=inactive"), "{answer}");
    }

    #[test]
    fn answers_the_first_payload_type_inactive() {
        let offer = "v=0\r\no=- 1 1 IN IP4 192.0.2.2\r\ns=-\r\nc=IN IP4 192.0.2.2\r\nt=0 0\r\n\
                     m=audio 29526 RTP/AVP 96 0 8 101\r\na=rtpmap:96 opus/48000/2\r\na=fmtp:96 useinbandfec=1\r\n\
                     a=rtpmap:0 PCMU/8000\r\na=sendrecv\r\nm=video 30000 RTP/AVP 97\r\n";
        let a = answer(offer.as_bytes(), "10.0.0.5".parse().unwrap(), 7).unwrap();
        assert_eq!(
            a,
            "v=0\r\no=- 7 7 IN IP4 10.0.0.5\r\ns=sip-relay\r\nc=IN IP4 10.0.0.5\r\nt=0 0\r\n\
             m=audio 9 RTP/AVP 96\r\na=rtpmap:96 opus/48000/2\r\na=fmtp:96 useinbandfec=1\r\na=inactive\r\n\
             m=video 0 RTP/AVP 97\r\n"
        );
        assert!(answer(b"v=0\r\ns=-\r\n", "10.0.0.5".parse().unwrap(), 7).is_none());
        assert!(answer(b"hello", "10.0.0.5".parse().unwrap(), 7).is_none());
        assert!(is_sdp(Some("Application/SDP; charset=x")));
        assert!(!is_sdp(None));
    }
}
