//! LDAP tables (R3d, R28, R45): a search per lookup against the directory, e.g. the seed's
//! `mailLocalAddress` / `mailHost` schema:
//!
//! ```text
//! table directory = ldap {
//!   url "ldap://127.0.0.1:389"; base "dc=example,dc=com";
//!   filter "(mailLocalAddress=%s)"; attribute "mailHost";
//! };
//! ```
//!
//! `%s` is the key, `%u` its local part, `%d` its domain, each escaped (RFC 4515). With an
//! `attribute` the value is that attribute of the first entry (several values joined with
//! `,`); without, a hit is the empty value (presence). No entry is "absent". A failed bind
//! or search, or the time-out, is an error answer: 4xx unless the table says `on_error
//! continue`.

use std::collections::HashMap;
use std::time::Duration;

use ldap3::{ldap_escape, LdapConnAsync, Scope, SearchEntry};
use mailpolicy_lang::ir::{OptValue, Program, Resource};

use crate::eval::Answer;

fn opt<'a>(t: &'a Resource, name: &str) -> Option<&'a str> {
    match t.option(name) {
        Some(OptValue::Str(s)) => Some(s.as_str()),
        Some(OptValue::Word(s)) => Some(s.as_str()),
        _ => None,
    }
}

/// Fill `%s`, `%u`, `%d` in a filter, escaping the values.
pub fn expand_filter(filter: &str, key: &str) -> String {
    let (local, domain) = match key.rsplit_once('@') {
        Some((l, d)) => (l, d),
        None => (key, ""),
    };
    let mut out = String::with_capacity(filter.len() + key.len());
    let mut chars = filter.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('s') => out.push_str(&ldap_escape(key)),
            Some('u') => out.push_str(&ldap_escape(local)),
            Some('d') => out.push_str(&ldap_escape(domain)),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

pub async fn lookup(
    prog: &Program,
    t: &Resource,
    key: &str,
    secrets: &HashMap<String, String>,
    default_timeout: Duration,
) -> Answer {
    let timeout = super::lookup::table_timeout(t, default_timeout);
    match tokio::time::timeout(timeout, search(prog, t, key, secrets)).await {
        Ok(Ok(v)) => Answer::Value(v),
        Ok(Err(e)) => Answer::Error(format!("ldap table {}: {e}", t.name)),
        Err(_) => Answer::Timeout,
    }
}

async fn search(
    prog: &Program,
    t: &Resource,
    key: &str,
    secrets: &HashMap<String, String>,
) -> Result<Option<String>, String> {
    let url = opt(t, "url").ok_or("no url")?;
    let base = opt(t, "base").ok_or("no base")?;
    let filter = expand_filter(opt(t, "filter").ok_or("no filter")?, key);
    let scope = match opt(t, "scope") {
        Some("one") => Scope::OneLevel,
        Some("base") => Scope::Base,
        _ => Scope::Subtree,
    };
    let attribute = opt(t, "attribute");
    let (conn, mut ldap) = LdapConnAsync::new(url).await.map_err(|e| e.to_string())?;
    ldap3::drive!(conn);
    if let Some(dn) = opt(t, "bind_dn") {
        let pw = super::lookup::table_secret(prog, t, "password", secrets).unwrap_or_default();
        ldap.simple_bind(dn, &pw).await.and_then(|r| r.success()).map_err(|e| format!("bind: {e}"))?;
    }
    let attrs: Vec<&str> = match attribute {
        Some(a) => vec![a],
        None => vec!["1.1"],
    };
    let (entries, _) =
        ldap.search(base, scope, &filter, attrs).await.and_then(|r| r.success()).map_err(|e| format!("search: {e}"))?;
    let _ = ldap.unbind().await;
    let Some(first) = entries.into_iter().next() else { return Ok(None) };
    let entry = SearchEntry::construct(first);
    Ok(Some(match attribute {
        Some(a) => {
            entry.attrs.iter().find(|(k, _)| k.eq_ignore_ascii_case(a)).map(|(_, v)| v.join(",")).unwrap_or_default()
        }
        None => String::new(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_are_escaped() {
        assert_eq!(expand_filter("(mailLocalAddress=%s)", "a@b.example"), "(mailLocalAddress=a@b.example)");
        assert_eq!(expand_filter("(&(uid=%u)(dc=%d))", "joe@example.com"), "(&(uid=joe)(dc=example.com))");
        assert_eq!(expand_filter("(mail=%s)", "x*)(uid=*"), "(mail=x\\2a\\29\\28uid=\\2a)");
        assert_eq!(expand_filter("100%%", "k"), "100%");
    }
}
