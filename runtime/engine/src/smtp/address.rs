//! RFC 5321 4.1.2 paths, with RFC 6531 (SMTPUTF8) extensions when allowed.
//!
//! The engine parses and validates; it never interprets `%`, `!` or source
//! routes as routing. The local part is exposed exactly as the client meant
//! it (quotes removed, quoted-pairs resolved), so a policy can see and
//! refuse `%`-hacks and bang paths.

use std::fmt;

/// Longest path, brackets included (RFC 5321 4.5.3.1.3).
pub const MAX_PATH: usize = 256;
/// Longest domain (RFC 5321 4.5.3.1.2).
pub const MAX_DOMAIN: usize = 255;

/// `local-part@domain`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Mailbox {
    /// The local part, unquoted (`john doe` for `"john doe"`), case preserved.
    pub local: String,
    /// True when the client sent the local part as a quoted string.
    pub quoted: bool,
    /// The domain as sent (case preserved); an address literal keeps its
    /// brackets, e.g. `[192.0.2.1]` or `[IPv6:2001:db8::1]`.
    pub domain: String,
    /// A source route (`<@hop,@hop:user@domain>`, RFC 5321 4.1.2) was given and dropped.
    pub routed: bool,
}

impl Mailbox {
    /// True if the domain is an address literal.
    pub fn is_address_literal(&self) -> bool {
        self.domain.starts_with('[')
    }

    /// True if local part or domain contains non-ASCII characters.
    pub fn is_international(&self) -> bool {
        !self.local.is_ascii() || !self.domain.is_ascii()
    }
}

impl fmt::Display for Mailbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if is_dot_string(&self.local, true) {
            write!(f, "{}@{}", self.local, self.domain)
        } else {
            f.write_str("\"")?;
            for c in self.local.chars() {
                if c == '"' || c == '\\' {
                    f.write_str("\\")?;
                }
                write!(f, "{c}")?;
            }
            write!(f, "\"@{}", self.domain)
        }
    }
}

/// The argument of `MAIL FROM:`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ReversePath {
    /// `<>`: the null sender, used by bounces.
    Null,
    /// A mailbox.
    Mailbox(Mailbox),
}

impl fmt::Display for ReversePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReversePath::Null => f.write_str("<>"),
            ReversePath::Mailbox(m) => write!(f, "<{m}>"),
        }
    }
}

/// The argument of `RCPT TO:`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ForwardPath {
    /// `<postmaster>` without a domain (case-insensitive), RFC 5321 4.5.1.
    Postmaster,
    /// A mailbox.
    Mailbox(Mailbox),
}

impl fmt::Display for ForwardPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ForwardPath::Postmaster => f.write_str("<postmaster>"),
            ForwardPath::Mailbox(m) => write!(f, "<{m}>"),
        }
    }
}

/// Why a path did not parse.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathError {
    /// Not RFC 5321 syntax.
    Syntax,
    /// Non-ASCII address without SMTPUTF8.
    NeedsSmtpUtf8,
    /// Longer than the RFC 5321 limits.
    TooLong,
}

fn is_atext(c: char, utf8: bool) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c) || (utf8 && !c.is_ascii())
}

fn is_dot_string(s: &str, utf8: bool) -> bool {
    !s.is_empty() && s.split('.').all(|a| !a.is_empty() && a.chars().all(|c| is_atext(c, utf8)))
}

/// Splits `s` (starting with `<`) into the bracketed path and the rest.
/// Honors quoted strings so that `>` inside quotes does not end the path.
pub(crate) fn split_path(s: &str) -> Option<(&str, &str)> {
    let mut in_quote = false;
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        if i == 0 {
            if c != '<' {
                return None;
            }
            continue;
        }
        if escaped {
            escaped = false;
            continue;
        }
        match c {
            '\\' if in_quote => escaped = true,
            '"' => in_quote = !in_quote,
            '>' if !in_quote => {
                let end = i + 1;
                return Some((s.get(..end)?, s.get(end..)?));
            }
            _ => {}
        }
    }
    None
}

fn parse_domain(d: &str, utf8: bool) -> bool {
    if d.is_empty() || d.len() > MAX_DOMAIN {
        return false;
    }
    d.split('.').all(|label| {
        let chars: Vec<char> = label.chars().collect();
        match (chars.first(), chars.last()) {
            (Some(f), Some(l)) => {
                let ok = |c: &char| c.is_ascii_alphanumeric() || (utf8 && !c.is_ascii());
                label.len() <= 63 && ok(f) && ok(l) && chars.iter().all(|c| ok(c) || *c == '-')
            }
            _ => false,
        }
    })
}

fn parse_address_literal(d: &str) -> bool {
    let inner = match d.strip_prefix('[').and_then(|x| x.strip_suffix(']')) {
        Some(i) => i,
        None => return false,
    };
    if inner.parse::<std::net::Ipv4Addr>().is_ok() && inner.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return true;
    }
    if let Some((tag, rest)) = inner.split_once(':') {
        if tag.eq_ignore_ascii_case("IPv6") {
            return rest.parse::<std::net::Ipv6Addr>().is_ok();
        }
        // General-address-literal: Standardized-tag ":" 1*dcontent
        let tag_ok =
            !tag.is_empty() && tag.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') && !tag.ends_with('-');
        let content_ok = !rest.is_empty() && rest.bytes().all(|b| (33..=90).contains(&b) || (94..=126).contains(&b));
        return tag_ok && content_ok;
    }
    false
}

/// Parses a quoted string at the start of `s`; returns (unquoted, rest).
fn parse_quoted(s: &str, utf8: bool) -> Option<(String, &str)> {
    let mut out = String::new();
    let mut it = s.char_indices();
    match it.next() {
        Some((_, '"')) => {}
        _ => return None,
    }
    let mut escaped = false;
    for (i, c) in it {
        if escaped {
            // quoted-pairSMTP = %d92 %d32-126
            if !(' '..='~').contains(&c) {
                return None;
            }
            out.push(c);
            escaped = false;
            continue;
        }
        match c {
            '\\' => escaped = true,
            '"' => return Some((out, s.get(i + 1..)?)),
            // qtextSMTP = %d32-33 / %d35-91 / %d93-126
            c if (' '..='~').contains(&c) => out.push(c),
            c if utf8 && !c.is_ascii() => out.push(c),
            _ => return None,
        }
    }
    None
}

/// Parses `local@domain` (no brackets).
fn parse_mailbox(s: &str, utf8: bool) -> Result<Mailbox, PathError> {
    let (local, quoted, rest) = if s.starts_with('"') {
        let (l, rest) = parse_quoted(s, true).ok_or(PathError::Syntax)?;
        (l, true, rest)
    } else {
        let at = s.rfind('@').ok_or(PathError::Syntax)?;
        let l = s.get(..at).ok_or(PathError::Syntax)?;
        if !is_dot_string(l, true) {
            return Err(PathError::Syntax);
        }
        (l.to_string(), false, s.get(at..).ok_or(PathError::Syntax)?)
    };
    let domain = rest.strip_prefix('@').ok_or(PathError::Syntax)?;
    let domain_ok = if domain.starts_with('[') { parse_address_literal(domain) } else { parse_domain(domain, true) };
    if !domain_ok {
        return Err(PathError::Syntax);
    }
    let mb = Mailbox { local, quoted, domain: domain.to_string(), routed: false };
    if !utf8 && mb.is_international() {
        return Err(PathError::NeedsSmtpUtf8);
    }
    Ok(mb)
}

/// Parses the inside of `<...>`: optional source route, then mailbox.
fn parse_inner(inner: &str, utf8: bool) -> Result<Mailbox, PathError> {
    let routed = inner.starts_with('@');
    let mailbox = if routed {
        // A-d-l ":" Mailbox; the route is syntax-checked and ignored.
        let (route, mb) = inner.split_once(':').ok_or(PathError::Syntax)?;
        for hop in route.split(',') {
            let d = hop.strip_prefix('@').ok_or(PathError::Syntax)?;
            let ok = if d.starts_with('[') { parse_address_literal(d) } else { parse_domain(d, utf8) };
            if !ok {
                return Err(PathError::Syntax);
            }
        }
        mb
    } else {
        inner
    };
    parse_mailbox(mailbox, utf8).map(|m| Mailbox { routed, ..m })
}

fn strip_brackets(path: &str) -> Result<&str, PathError> {
    if path.len() > MAX_PATH {
        return Err(PathError::TooLong);
    }
    path.strip_prefix('<').and_then(|p| p.strip_suffix('>')).ok_or(PathError::Syntax)
}

/// Parses a reverse path such as `<>` or `<a@b>` (brackets included).
pub fn parse_reverse_path(path: &str, utf8: bool) -> Result<ReversePath, PathError> {
    let inner = strip_brackets(path)?;
    if inner.is_empty() {
        return Ok(ReversePath::Null);
    }
    parse_inner(inner, utf8).map(ReversePath::Mailbox)
}

/// Parses a forward path such as `<postmaster>` or `<a@b>` (brackets included).
pub fn parse_forward_path(path: &str, utf8: bool) -> Result<ForwardPath, PathError> {
    let inner = strip_brackets(path)?;
    if inner.eq_ignore_ascii_case("postmaster") {
        return Ok(ForwardPath::Postmaster);
    }
    parse_inner(inner, utf8).map(ForwardPath::Mailbox)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mb(local: &str, domain: &str) -> Mailbox {
        Mailbox { local: local.into(), quoted: false, domain: domain.into(), routed: false }
    }

    #[test]
    fn reverse_paths() {
        assert_eq!(parse_reverse_path("<>", false), Ok(ReversePath::Null));
        assert_eq!(parse_reverse_path("<a.b@example.com>", false), Ok(ReversePath::Mailbox(mb("a.b", "example.com"))));
        assert_eq!(
            parse_reverse_path("<@a.example,@b.example:user@c.example>", false),
            Ok(ReversePath::Mailbox(Mailbox { routed: true, ..mb("user", "c.example") }))
        );
        assert_eq!(
            parse_reverse_path("<user%other@example.com>", false),
            Ok(ReversePath::Mailbox(mb("user%other", "example.com")))
        );
        assert_eq!(
            parse_reverse_path("<host!user@example.com>", false),
            Ok(ReversePath::Mailbox(mb("host!user", "example.com")))
        );
        let q = parse_reverse_path("<\"john doe\"@example.com>", false).unwrap();
        match &q {
            ReversePath::Mailbox(m) => {
                assert_eq!(m.local, "john doe");
                assert!(m.quoted);
                assert_eq!(m.to_string(), "\"john doe\"@example.com");
            }
            ReversePath::Null => panic!(),
        }
        assert!(parse_reverse_path("<postmaster>", false).is_err());
        for bad in [
            "<a@>",
            "<@b>",
            "<a>",
            "a@b",
            "<a@b",
            "<a..b@c>",
            "<.a@c>",
            "<a@b..c>",
            "<a@-b.c>",
            "<a b@c>",
            "<a@[1.2.3]>",
            "<a@[IPv6:zz]>",
            "<\"x@c>",
            "<@a:>",
            "<a@b_c>",
        ] {
            assert_eq!(parse_reverse_path(bad, false), Err(PathError::Syntax), "{bad}");
        }
    }

    #[test]
    fn literals_and_limits() {
        assert!(parse_reverse_path("<a@[192.0.2.1]>", false).is_ok());
        assert!(parse_reverse_path("<a@[IPv6:2001:db8::1]>", false).is_ok());
        assert!(parse_reverse_path("<a@[x-tag:abc]>", false).is_ok());
        let long = format!("<{}@example.com>", "a".repeat(250));
        assert_eq!(parse_reverse_path(&long, false), Err(PathError::TooLong));
    }

    #[test]
    fn forward_paths_and_utf8() {
        assert_eq!(parse_forward_path("<PostMaster>", false), Ok(ForwardPath::Postmaster));
        assert!(matches!(parse_forward_path("<postmaster@example.com>", false), Ok(ForwardPath::Mailbox(_))));
        assert_eq!(parse_forward_path("<jörg@exämple.de>", false), Err(PathError::NeedsSmtpUtf8));
        assert!(parse_forward_path("<jörg@exämple.de>", true).is_ok());
    }

    #[test]
    fn split_respects_quotes() {
        assert_eq!(split_path("<\"a>b\"@c> X=1"), Some(("<\"a>b\"@c>", " X=1")));
        assert_eq!(split_path("<a@b>"), Some(("<a@b>", "")));
        assert_eq!(split_path("a@b"), None);
        assert_eq!(split_path("<a@b"), None);
    }
}
