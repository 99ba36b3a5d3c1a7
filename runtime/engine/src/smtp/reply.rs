//! SMTP replies: construction, sanitising and wire formatting.

use std::fmt;

/// Longest reply line on the wire, CRLF included (RFC 5321 4.5.3.1.5).
pub const MAX_REPLY_LINE: usize = 512;

/// An SMTP reply as the host or the engine describes it.
///
/// `text` may contain `\n` to produce a multi-line reply; each line gets the
/// code (and enhanced code) prefix. Control characters (CR included) are
/// replaced by `?`, and each line is cut so that the wire line, prefix and
/// CRLF included, fits in 512 octets. Host text therefore can never inject
/// an extra reply line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// Three-digit reply code, 200..=599. Other values are sent as `451 4.3.0`.
    pub code: u16,
    /// RFC 3463 enhanced status code `class.subject.detail`. The class is
    /// forced to the first digit of `code` when they disagree.
    pub enhanced: Option<(u8, u16, u16)>,
    /// Human readable text; `\n` separates lines.
    pub text: String,
}

impl Reply {
    /// A reply with an enhanced status code.
    pub fn new(code: u16, enhanced: (u8, u16, u16), text: impl Into<String>) -> Reply {
        Reply { code, enhanced: Some(enhanced), text: text.into() }
    }

    /// A reply without an enhanced status code.
    pub fn plain(code: u16, text: impl Into<String>) -> Reply {
        Reply { code, enhanced: None, text: text.into() }
    }

    /// True for 4xx and 5xx replies.
    pub fn is_error(&self) -> bool {
        (400..600).contains(&self.code)
    }

    /// True for 2xx and 3xx replies.
    pub fn is_positive(&self) -> bool {
        (200..400).contains(&self.code)
    }

    /// Parses `"550 5.7.1 text"` / `"250 text"` (single line). Returns
    /// `None` if there is no valid three-digit code.
    pub fn parse(s: &str) -> Option<Reply> {
        let s = s.trim_end_matches(['\r', '\n']);
        let code_str = s.get(..3)?;
        if !code_str.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let code: u16 = code_str.parse().ok()?;
        if !(200..600).contains(&code) {
            return None;
        }
        let rest = s.get(3..)?;
        let rest = rest.strip_prefix([' ', '-']).unwrap_or(rest);
        let mut enhanced = None;
        let mut text = rest;
        if let Some((first, tail)) = rest.split_once(' ').or(Some((rest, ""))) {
            if let Some(e) = parse_enhanced(first) {
                enhanced = Some(e);
                text = tail;
            }
        }
        Some(Reply { code, enhanced, text: text.to_string() })
    }

    /// The reply as logs, transcripts, `mailc route` and the queue's records show it: one
    /// line, `550 5.7.1 text` (`250 text` without an enhanced code), the text as it is (the
    /// wire form, [`Reply::to_wire`], is the one that sanitises, splits and cuts).
    pub fn line(&self) -> String {
        match self.enhanced {
            Some((a, b, c)) => format!("{} {a}.{b}.{c} {}", self.code, self.text),
            None => format!("{} {}", self.code, self.text),
        }
    }

    /// Wire form, with or without enhanced codes.
    pub(crate) fn to_wire(&self, with_enhanced: bool) -> Vec<u8> {
        let mut code = self.code;
        let mut enhanced = self.enhanced;
        if !(200..600).contains(&code) {
            code = 451;
            enhanced = Some((4, 3, 0));
        }
        let class = (code / 100) as u8;
        let enhanced = match enhanced {
            Some((_, s, d)) if with_enhanced && (2..=5).contains(&class) && class != 3 => Some((class, s, d)),
            _ => None,
        };
        let prefix_e = enhanced.map(|(c, s, d)| format!("{c}.{s}.{d} ")).unwrap_or_default();
        let lines: Vec<String> =
            if self.text.is_empty() { vec![String::new()] } else { self.text.split('\n').map(sanitise_line).collect() };
        let mut out = Vec::new();
        let n = lines.len();
        for (i, line) in lines.into_iter().enumerate() {
            let sep = if i + 1 == n { ' ' } else { '-' };
            let mut l = format!("{code:03}{sep}{prefix_e}");
            // room left for text: 512 - prefix - CRLF
            let room = MAX_REPLY_LINE.saturating_sub(l.len() + 2);
            l.push_str(truncate_at_char(&line, room));
            let l = l.trim_end().to_string();
            out.extend_from_slice(l.as_bytes());
            // "250" alone is fine; "250 " with no text is trimmed to "250"
            out.extend_from_slice(b"\r\n");
        }
        out
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let w = self.to_wire(true);
        let s = String::from_utf8_lossy(&w);
        f.write_str(s.trim_end())
    }
}

fn parse_enhanced(s: &str) -> Option<(u8, u16, u16)> {
    let mut it = s.split('.');
    let c: u8 = it.next()?.parse().ok()?;
    let sub: u16 = it.next()?.parse().ok()?;
    let det: u16 = it.next()?.parse().ok()?;
    if it.next().is_some() || !(2..=5).contains(&c) || c == 3 || sub > 999 || det > 999 {
        return None;
    }
    Some((c, sub, det))
}

fn sanitise_line(line: &str) -> String {
    line.chars().map(|c| if c.is_control() && c != '\t' { '?' } else { c }).collect()
}

fn truncate_at_char(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while end > 0 && !s.is_char_boundary(end) {
        end -= 1;
    }
    s.get(..end).unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(r: &Reply) -> String {
        String::from_utf8(r.to_wire(true)).unwrap()
    }

    #[test]
    fn single_and_multi_line() {
        assert_eq!(wire(&Reply::new(250, (2, 1, 0), "Sender OK")), "250 2.1.0 Sender OK\r\n");
        assert_eq!(wire(&Reply::new(550, (5, 7, 1), "a\nb")), "550-5.7.1 a\r\n550 5.7.1 b\r\n");
        assert_eq!(wire(&Reply::plain(354, "go")), "354 go\r\n");
        // class mismatch is corrected, 3xx never carries an enhanced code
        assert_eq!(wire(&Reply::new(451, (5, 7, 1), "x")), "451 4.7.1 x\r\n");
        assert_eq!(wire(&Reply::new(354, (2, 0, 0), "x")), "354 x\r\n");
        assert_eq!(wire(&Reply::new(99, (2, 0, 0), "x")), "451 4.3.0 x\r\n");
    }

    #[test]
    fn no_injection_and_length_cap() {
        let r = Reply::new(550, (5, 7, 1), "evil\r\n250 ok\rmore\x00");
        let w = wire(&r);
        assert_eq!(w, "550-5.7.1 evil?\r\n550 5.7.1 250 ok?more?\r\n");
        let long = "é".repeat(600);
        let w = wire(&Reply::new(550, (5, 7, 1), long));
        assert!(w.len() <= MAX_REPLY_LINE);
        assert!(w.ends_with("\r\n"));
        assert_eq!(w.matches("\r\n").count(), 1);
    }

    #[test]
    fn parse_reply() {
        let r = Reply::parse("550 5.7.1 Relay denied").unwrap();
        assert_eq!(r, Reply::new(550, (5, 7, 1), "Relay denied"));
        let r = Reply::parse("250 ok").unwrap();
        assert_eq!(r, Reply::plain(250, "ok"));
        assert!(Reply::parse("xx").is_none());
        assert!(Reply::parse("700 no").is_none());
    }
}
