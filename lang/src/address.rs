//! Address helpers shared by the checker's analysis, the evaluator and the queue (pure;
//! `mailpolicy_stdlib::address` re-exports them).

/// Split `local@domain` at the last `@`; the domain is lower-cased. An address without `@`
/// (e.g. `postmaster`) has an empty domain.
pub fn split(address: &str) -> (&str, String) {
    match address.rsplit_once('@') {
        Some((l, d)) => (l, d.to_ascii_lowercase()),
        None => (address, String::new()),
    }
}

/// The subaddress detail: the part of the local part after the first `+`.
pub fn detail(local: &str) -> &str {
    local.split_once('+').map(|(_, d)| d).unwrap_or("")
}

/// A local part that could be read as routing by another MTA: `%`-hack, bang path, or an
/// `@` inside a quoted local part (R15).
pub fn has_routing(local: &str) -> bool {
    local.contains(['%', '!', '@'])
}

/// A syntactically fully qualified domain name: at least two labels, each 1-63 of letters,
/// digits and hyphens, not starting or ending with a hyphen, the last not all digits.
pub fn is_fqdn(name: &str) -> bool {
    let n = name.strip_suffix('.').unwrap_or(name);
    if n.len() > 253 {
        return false;
    }
    let labels: Vec<&str> = n.split('.').collect();
    if labels.len() < 2 {
        return false;
    }
    let ok = labels.iter().all(|l| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    });
    ok && labels.last().is_some_and(|l| !l.bytes().all(|b| b.is_ascii_digit()))
}

/// Domain-list matching: `example.com` matches exactly; `.example.com` matches its
/// subdomains only. Case-insensitive.
pub fn domain_matches(pattern: &str, domain: &str) -> bool {
    let d = domain.trim_end_matches('.');
    match pattern.strip_prefix('.') {
        Some(suffix) => {
            d.len() > suffix.len() && d.to_ascii_lowercase().ends_with(&format!(".{}", suffix.to_ascii_lowercase()))
        }
        None => d.eq_ignore_ascii_case(pattern),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fqdn() {
        assert!(is_fqdn("mx.example.com"));
        assert!(is_fqdn("example.com."));
        assert!(!is_fqdn("localhost"));
        assert!(!is_fqdn("[192.0.2.1]"));
        assert!(!is_fqdn("192.0.2.1"));
        assert!(!is_fqdn("-a.example.com"));
    }

    #[test]
    fn domains() {
        assert!(domain_matches("example.com", "EXAMPLE.com"));
        assert!(!domain_matches("example.com", "a.example.com"));
        assert!(domain_matches(".example.com", "a.example.com"));
        assert!(!domain_matches(".example.com", "example.com"));
        assert!(!domain_matches(".example.com", "badexample.com"));
    }

    #[test]
    fn routing() {
        assert!(has_routing("user%other.example"));
        assert!(has_routing("host!user"));
        assert!(!has_routing("first.last+tag"));
        assert_eq!(detail("user+tag"), "tag");
    }
}
