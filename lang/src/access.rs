//! sendmail / Postfix access-table semantics (R17, R18, R40).
//!
//! Two pure parts: which keys to look up, most specific first, for a client, a sender or a
//! recipient; and what a table value means.

use std::net::IpAddr;

/// The scope prefix sendmail uses in a combined access file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    Connect,
    From,
    To,
}

impl Scope {
    pub fn prefix(self) -> &'static str {
        match self {
            Scope::Connect => "Connect:",
            Scope::From => "From:",
            Scope::To => "To:",
        }
    }
}

/// Keys for a client: the IP address and its enclosing networks (`192.0.2.1`, `192.0.2`,
/// `192.0`, `192`; IPv6 by 16-bit groups), then the host name and its parent domains.
pub fn client_keys(ip: IpAddr, name: &str) -> Vec<String> {
    let mut keys = Vec::new();
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            keys.push(format!("{}.{}.{}.{}", o[0], o[1], o[2], o[3]));
            keys.push(format!("{}.{}.{}", o[0], o[1], o[2]));
            keys.push(format!("{}.{}", o[0], o[1]));
            keys.push(format!("{}", o[0]));
        }
        IpAddr::V6(v6) => {
            let segs = v6.segments();
            keys.push(v6.to_string());
            for n in (1..8).rev() {
                let s: Vec<String> = segs[..n].iter().map(|g| format!("{g:x}")).collect();
                keys.push(s.join(":"));
            }
        }
    }
    if !name.is_empty() && name != "unknown" {
        keys.extend(domain_keys(name));
    }
    keys
}

/// A domain and its parents: `a.b.example.com`, `b.example.com`, `example.com`, `com`.
pub fn domain_keys(domain: &str) -> Vec<String> {
    let d = domain.trim_end_matches('.').to_ascii_lowercase();
    let mut keys = Vec::new();
    let mut rest = d.as_str();
    loop {
        if !rest.is_empty() {
            keys.push(rest.to_string());
        }
        match rest.split_once('.') {
            Some((_, parent)) => rest = parent,
            None => break,
        }
    }
    keys
}

/// Keys for an address: `user@domain`, the domain and its parents, then `user@`.
/// The null sender looks up `<>`.
pub fn address_keys(address: &str) -> Vec<String> {
    if address.is_empty() {
        return vec!["<>".to_string()];
    }
    let lower = address.to_ascii_lowercase();
    let mut keys = vec![lower.clone()];
    if let Some((local, domain)) = lower.rsplit_once('@') {
        keys.extend(domain_keys(domain));
        keys.push(format!("{local}@"));
    }
    keys
}

/// Keys of a canonical or virtual alias table for an address (`rewrite sender TABLE`,
/// `rewrite recipient TABLE`, R36, R38), in Postfix's `virtual_alias_maps` and
/// `canonical_maps` order: `user@domain`, then `user` alone when the domain is one of
/// ours (`local`), then the catch-all `@domain`. A bare `domain` key is never looked up, so
/// Postfix's `example.com anything` lines that declare a virtual domain rewrite nothing.
pub fn rewrite_keys(address: &str, local: bool) -> Vec<String> {
    let lower = address.to_ascii_lowercase();
    let Some((user, domain)) = lower.rsplit_once('@') else {
        return if lower.is_empty() { Vec::new() } else { vec![lower] };
    };
    let mut keys = vec![lower.clone()];
    if local && !user.is_empty() {
        keys.push(user.to_string());
    }
    if !domain.is_empty() {
        keys.push(format!("@{domain}"));
    }
    keys
}

/// What an access-table value tells the stage to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AccessAction {
    /// OK / RELAY / a number (Postfix: permit): accept, end the stage.
    Accept,
    /// DUNNO / SKIP: stop looking at further keys, go on with the next rule.
    Dunno,
    /// REJECT [text], or an explicit 5xx reply.
    Reject { code: u16, enhanced: (u16, u16, u16), text: String },
    /// DEFER / TEMPFAIL [text], or an explicit 4xx reply.
    Tempfail { code: u16, enhanced: (u16, u16, u16), text: String },
    /// DISCARD: accept and drop.
    Discard,
    /// HOLD [text]: accept into the hold queue and go on.
    Hold(String),
    /// WARN text: log and go on.
    Warn(String),
    /// sendmail `delay_checks` (R17): FRIEND on a recipient's `To:` (or `Spam:`) key lets
    /// it receive mail whose client or sender an `access ... :delay` refused; go on.
    Friend,
    /// HATER on a recipient's key: with `:delay hater`, only such recipients get the
    /// delayed refusal; go on.
    Hater,
    /// A value this table cannot mean: treated as a configuration error (temporary failure).
    Invalid(String),
}

/// Interpret one value. `default_reject` is the stage's reject reply code (e.g. 554 at connect).
pub fn parse_value(value: &str) -> AccessAction {
    let v = value.trim();
    let (word, rest) = match v.split_once(char::is_whitespace) {
        Some((w, r)) => (w, r.trim()),
        None => (v, ""),
    };
    let upper = word.to_ascii_uppercase();
    match upper.as_str() {
        "OK" | "RELAY" => AccessAction::Accept,
        "DUNNO" | "SKIP" => AccessAction::Dunno,
        "DISCARD" => AccessAction::Discard,
        "REJECT" => AccessAction::Reject {
            code: 554,
            enhanced: (5, 7, 1),
            text: if rest.is_empty() { "Access denied".into() } else { rest.into() },
        },
        "DEFER" | "TEMPFAIL" | "DEFER_IF_PERMIT" => AccessAction::Tempfail {
            code: 450,
            enhanced: (4, 7, 1),
            text: if rest.is_empty() { "Try again later".into() } else { rest.into() },
        },
        "HOLD" => AccessAction::Hold(rest.to_string()),
        "WARN" => AccessAction::Warn(rest.to_string()),
        "FRIEND" => AccessAction::Friend,
        "HATER" => AccessAction::Hater,
        _ if word.chars().all(|c| c.is_ascii_digit()) && word.len() == 3 => explicit_reply(word, rest, value),
        _ if upper.starts_with("ERROR:") => {
            // sendmail: ERROR:5.7.1:550 text, ERROR:550 text, ERROR:"550 text", ERROR:5.7.1 text
            let body = v.get(6..).unwrap_or("").trim().trim_matches('"');
            let mut parts = body.splitn(2, char::is_whitespace);
            let head = parts.next().unwrap_or("");
            let text = parts.next().unwrap_or("").trim();
            let (enh, code) = match head.split_once(':') {
                Some((e, c)) => (parse_enh(e), c.parse::<u16>().ok()),
                None => match parse_enh(head) {
                    Some(e) => (Some(e), None),
                    None => (None, head.parse::<u16>().ok()),
                },
            };
            let class = enh.map(|e| e.0).or(code.map(|c| c / 100)).unwrap_or(5);
            let code = code.unwrap_or(if class == 4 { 450 } else { 550 });
            let enhanced = enh.unwrap_or((code / 100, 7, 1));
            let text = if text.is_empty() { "Access denied".to_string() } else { text.to_string() };
            if code / 100 == 4 {
                AccessAction::Tempfail { code, enhanced, text }
            } else if code / 100 == 5 && enhanced.0 == 5 {
                AccessAction::Reject { code, enhanced, text }
            } else {
                AccessAction::Invalid(value.to_string())
            }
        }
        // Postfix: a number alone means OK (e.g. a map used for permit_mynetworks style lists).
        _ if !word.is_empty() && word.chars().all(|c| c.is_ascii_digit()) => AccessAction::Accept,
        _ => AccessAction::Invalid(value.to_string()),
    }
}

fn explicit_reply(code: &str, rest: &str, value: &str) -> AccessAction {
    let code: u16 = code.parse().unwrap_or(0);
    let (enh, text) = match rest.split_once(char::is_whitespace) {
        Some((e, t)) if parse_enh(e).is_some() => (parse_enh(e), t.trim()),
        _ => match parse_enh(rest) {
            Some(e) => (Some(e), ""),
            None => (None, rest),
        },
    };
    let enhanced = enh.unwrap_or((code / 100, 7, 1));
    let text = if text.is_empty() { "Access denied".to_string() } else { text.to_string() };
    if enhanced.0 != code / 100 {
        return AccessAction::Invalid(value.to_string());
    }
    match code / 100 {
        4 => AccessAction::Tempfail { code, enhanced, text },
        5 => AccessAction::Reject { code, enhanced, text },
        2 => AccessAction::Accept,
        _ => AccessAction::Invalid(value.to_string()),
    }
}

fn parse_enh(s: &str) -> Option<(u16, u16, u16)> {
    let mut it = s.split('.');
    let a = it.next()?.parse().ok()?;
    let b = it.next()?.parse().ok()?;
    let c = it.next()?.parse().ok()?;
    if it.next().is_some() || !matches!(a, 2 | 4 | 5) {
        return None;
    }
    Some((a, b, c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys() {
        assert_eq!(
            client_keys("192.0.2.7".parse().unwrap(), "mx.a.example"),
            ["192.0.2.7", "192.0.2", "192.0", "192", "mx.a.example", "a.example", "example"]
        );
        assert_eq!(
            address_keys("Joe@Sub.Example.com"),
            ["joe@sub.example.com", "sub.example.com", "example.com", "com", "joe@"]
        );
        assert_eq!(address_keys(""), ["<>"]);
    }

    #[test]
    fn values() {
        assert_eq!(parse_value("OK"), AccessAction::Accept);
        assert_eq!(parse_value("relay"), AccessAction::Accept);
        assert_eq!(parse_value("SKIP"), AccessAction::Dunno);
        assert_eq!(
            parse_value("REJECT"),
            AccessAction::Reject { code: 554, enhanced: (5, 7, 1), text: "Access denied".into() }
        );
        assert_eq!(
            parse_value("550 5.7.1 go away"),
            AccessAction::Reject { code: 550, enhanced: (5, 7, 1), text: "go away".into() }
        );
        assert_eq!(
            parse_value("550 no spam"),
            AccessAction::Reject { code: 550, enhanced: (5, 7, 1), text: "no spam".into() }
        );
        assert_eq!(
            parse_value("ERROR:5.7.1 Spammer"),
            AccessAction::Reject { code: 550, enhanced: (5, 7, 1), text: "Spammer".into() }
        );
        assert_eq!(
            parse_value("ERROR:4.7.0:451 later"),
            AccessAction::Tempfail { code: 451, enhanced: (4, 7, 0), text: "later".into() }
        );
        assert_eq!(
            parse_value("ERROR:\"550 Go away\""),
            AccessAction::Reject { code: 550, enhanced: (5, 7, 1), text: "Go away".into() }
        );
        assert_eq!(parse_value("DISCARD"), AccessAction::Discard);
        assert_eq!(parse_value("HOLD quarantine"), AccessAction::Hold("quarantine".into()));
        assert_eq!(parse_value("FRIEND"), AccessAction::Friend);
        assert_eq!(parse_value("hater"), AccessAction::Hater);
        assert!(matches!(parse_value("550 4.7.1 mismatch"), AccessAction::Invalid(_)));
        assert!(matches!(parse_value("MAYBE"), AccessAction::Invalid(_)));
    }
}
