//! Line splitting and stream framing (RFC 3261 §7.5, §18.3; RFC 5626 §3.5.1 keepalives).

use super::grammar::{is_wsp, trim_end_wsp, trim_wsp};
use super::{Frame, ParseError};

/// Iterates lines ending in LF (a CR before the LF is dropped). The last line may lack its LF.
pub(super) struct Lines<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Lines<'a> {
    pub(super) fn new(buf: &'a [u8]) -> Self {
        Lines { buf, pos: 0 }
    }
    /// Offset of the first byte not yet returned.
    pub(super) fn pos(&self) -> usize {
        self.pos
    }
}

impl<'a> Iterator for Lines<'a> {
    type Item = &'a [u8];
    fn next(&mut self) -> Option<&'a [u8]> {
        let rest = self.buf.get(self.pos..)?;
        if rest.is_empty() {
            return None;
        }
        match rest.iter().position(|&b| b == b'\n') {
            Some(i) => {
                self.pos += i + 1;
                let line = rest.get(..i)?;
                Some(line.strip_suffix(b"\r").unwrap_or(line))
            }
            None => {
                self.pos = self.buf.len();
                Some(rest)
            }
        }
    }
}

/// Index just past the blank line ending the header block, if there is one.
/// Accepts CRLF and bare LF line ends. `buf` must not start with a blank line.
pub(super) fn header_end(buf: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(rel) = buf.get(from..)?.iter().position(|&b| b == b'\n') {
        let nl = from + rel;
        match (buf.get(nl + 1), buf.get(nl + 2)) {
            (Some(b'\n'), _) => return Some(nl + 2),
            (Some(b'\r'), Some(b'\n')) => return Some(nl + 3),
            _ => from = nl + 1,
        }
    }
    None
}

/// Content-Length value: digits only; saturates on absurd values (they can never match a body).
pub(super) fn parse_content_length(v: &str) -> Option<u64> {
    let v = trim_wsp(v);
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(v.parse::<u64>().unwrap_or(u64::MAX))
}

/// Content-Length of a header block (start line excluded), `Ok(None)` if absent.
fn block_content_length(head: &[u8]) -> Result<Option<u64>, ParseError> {
    let mut found: Option<u64> = None;
    for line in Lines::new(head).skip(1) {
        if line.first().is_some_and(|&b| is_wsp(b)) {
            continue;
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (name, value) = line.split_at(colon);
        let Ok(name) = std::str::from_utf8(name) else {
            continue;
        };
        let name = trim_end_wsp(name);
        if !(name.eq_ignore_ascii_case("content-length") || name.eq_ignore_ascii_case("l")) {
            continue;
        }
        let value = std::str::from_utf8(value.get(1..).unwrap_or_default())
            .ok()
            .and_then(parse_content_length)
            .ok_or_else(|| ParseError::bad("Bad Content-Length"))?;
        if found.is_some_and(|f| f != value) {
            return Err(ParseError::bad("Conflicting Content-Length"));
        }
        found = Some(value);
    }
    Ok(found)
}

fn keepalive(buf: &[u8]) -> Frame {
    match buf {
        [b'\r', b'\n', b'\r', b'\n', ..] => Frame::Keepalive { len: 4, ping: true },
        // Could still become a double CRLF.
        [b'\r'] | [b'\r', b'\n', b'\r'] => Frame::Incomplete,
        [b'\r', b'\n', ..] => Frame::Keepalive {
            len: 2,
            ping: false,
        },
        // Bare LF keepalives are tolerated like bare-LF line ends.
        [b'\n', ..] => Frame::Keepalive {
            len: 1,
            ping: false,
        },
        _ => Frame::Invalid(ParseError::bad("Stray CR")),
    }
}

pub(super) fn frame(buf: &[u8], max: usize) -> Frame {
    match buf.first() {
        None => return Frame::Incomplete,
        Some(b'\r' | b'\n') => return keepalive(buf),
        Some(_) => {}
    }
    let window = buf.get(..buf.len().min(max)).unwrap_or(buf);
    let Some(end) = header_end(window) else {
        return if buf.len() >= max {
            Frame::Invalid(ParseError::new(513, "Message Too Large"))
        } else {
            Frame::Incomplete
        };
    };
    let head = window.get(..end).unwrap_or(window);
    let cl = match block_content_length(head) {
        Ok(Some(cl)) => cl,
        Ok(None) => return Frame::Invalid(ParseError::bad("Missing Content-Length on a stream")),
        Err(e) => return Frame::Invalid(e),
    };
    let total = u64::try_from(end).unwrap_or(u64::MAX).saturating_add(cl);
    match usize::try_from(total) {
        Ok(total) if total <= max => {
            if buf.len() < total {
                Frame::Incomplete
            } else {
                Frame::Message(total)
            }
        }
        _ => Frame::Invalid(ParseError::new(513, "Message Too Large")),
    }
}
