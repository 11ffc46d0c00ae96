//! Writing what came from the network into log lines, and whether log lines may be coloured.
//!
//! [`Esc`] shows a string with its control characters escaped (`\r`, `\n`, `\t`, `\x1b`, …), so a
//! user name, a Call-ID or a reason phrase cannot forge a log line or drive a terminal.

use std::fmt;

/// Whether log lines on standard error may carry colours: only on a terminal, and never with
/// `NO_COLOR` set (logs often go to files and journals).
pub fn colours() -> bool {
    std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("NO_COLOR").is_none()
}

/// A string shown with control characters escaped; everything else as it is.
#[derive(Debug, Clone, Copy)]
pub struct Esc<'a>(pub &'a str);

impl fmt::Display for Esc<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0;
        let mut start = 0;
        for (i, c) in s.char_indices() {
            if !c.is_control() && c != '\\' {
                continue;
            }
            f.write_str(&s[start..i])?;
            match c {
                '\r' => f.write_str("\\r")?,
                '\n' => f.write_str("\\n")?,
                '\t' => f.write_str("\\t")?,
                '\\' => f.write_str("\\\\")?,
                c => write!(f, "\\u{{{:x}}}", u32::from(c))?,
            }
            start = i + c.len_utf8();
        }
        f.write_str(&s[start..])
    }
}

#[cfg(test)]
mod tests {
    use super::Esc;

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(Esc("alice").to_string(), "alice");
        assert_eq!(
            Esc("a\r\nINFO forged line").to_string(),
            "a\\r\\nINFO forged line"
        );
        assert_eq!(Esc("\u{1b}[31mred").to_string(), "\\u{1b}[31mred");
        assert_eq!(Esc("tab\there").to_string(), "tab\\there");
        assert_eq!(Esc("back\\slash").to_string(), "back\\\\slash");
        assert_eq!(Esc("\u{7f}").to_string(), "\\u{7f}");
        assert_eq!(Esc("müller").to_string(), "müller");
    }
}
