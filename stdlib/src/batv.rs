//! BATV with the PRVS scheme (R29): `prvs=KDDDSSSSSS=local@domain`, where K is the key
//! number (0-9), DDD the day the tag expires (days since the Unix epoch, modulo 1000) and
//! SSSSSS the first three bytes, in hex, of HMAC-SHA1 over `KDDD` and the original address.

use hmac::{Hmac, Mac};
use sha1::Sha1;

pub const DAY_MS: u64 = 86_400_000;

/// Parse the keys secret: one `NUMBER KEY` per line; the highest number signs.
pub fn parse_keys(text: &str) -> Vec<(u8, Vec<u8>)> {
    text.lines()
        .filter_map(|l| {
            let (n, k) = l.trim().split_once(char::is_whitespace)?;
            let n: u8 = n.parse().ok().filter(|n| *n <= 9)?;
            Some((n, k.trim().as_bytes().to_vec()))
        })
        .collect()
}

fn mac(key: &[u8], kddd: &str, address: &str) -> String {
    let Ok(mut m) = Hmac::<Sha1>::new_from_slice(key) else {
        return String::new();
    };
    m.update(kddd.as_bytes());
    m.update(address.to_ascii_lowercase().as_bytes());
    let out = m.finalize().into_bytes();
    out.iter().take(3).map(|b| format!("{b:02x}")).collect()
}

/// Sign `address` (an envelope sender) with key `num`, valid `lifetime_days` from `now_ms`.
/// An address already signed, or the null sender, is returned as it is.
pub fn sign(address: &str, num: u8, key: &[u8], now_ms: u64, lifetime_days: u64) -> String {
    if address.is_empty() || address.to_ascii_lowercase().starts_with("prvs=") {
        return address.to_string();
    }
    let expiry = (now_ms / DAY_MS + lifetime_days) % 1000;
    let kddd = format!("{}{:03}", num % 10, expiry);
    format!("prvs={kddd}{}={address}", mac(key, &kddd, address))
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// A valid, unexpired tag; the original address.
    Valid(String),
    Expired,
    BadSignature,
    UnknownKey,
    /// The address carries no tag.
    NotSigned,
}

/// Check a recipient of a bounce.
pub fn verify(address: &str, keys: &[(u8, Vec<u8>)], now_ms: u64, lifetime_days: u64) -> Check {
    let lower = address.to_ascii_lowercase();
    let Some(rest) = lower.strip_prefix("prvs=") else {
        return Check::NotSigned;
    };
    let Some((tag, orig)) = rest.split_once('=') else {
        return Check::NotSigned;
    };
    if tag.len() != 10 || !tag.bytes().all(|b| b.is_ascii_hexdigit()) || !tag[..4].bytes().all(|b| b.is_ascii_digit()) {
        return Check::NotSigned;
    }
    let num = tag.as_bytes()[0] - b'0';
    let Ok(expiry) = tag[1..4].parse::<u64>() else {
        return Check::NotSigned;
    };
    let Some((_, key)) = keys.iter().find(|(n, _)| *n == num) else {
        return Check::UnknownKey;
    };
    // Days left until expiry, modulo the 1000-day wheel.
    let today = (now_ms / DAY_MS) % 1000;
    let left = (expiry + 1000 - today) % 1000;
    if left > lifetime_days {
        return Check::Expired;
    }
    // Compare against the original address as written after the tag (case preserved there).
    let orig_written = &address[address.len() - orig.len()..];
    if mac(key, &tag[..4], orig_written) != tag[4..] {
        return Check::BadSignature;
    }
    Check::Valid(orig_written.to_string())
}

/// The address without its `prvs=KDDDSSSSSS=` tag, when it carries one that is well
/// formed (whether or not it verifies); `None` otherwise. The tag goes before routing and
/// delivery (R29): the back end knows `user@domain`, not the tagged form.
pub fn strip(address: &str) -> Option<String> {
    let lower = address.to_ascii_lowercase();
    let rest = lower.strip_prefix("prvs=")?;
    let (tag, orig) = rest.split_once('=')?;
    let well_formed = tag.len() == 10
        && tag.bytes().all(|b| b.is_ascii_hexdigit())
        && tag.bytes().take(4).all(|b| b.is_ascii_digit())
        && orig.contains('@')
        && !orig.starts_with('@');
    if !well_formed {
        return None;
    }
    // The original as written, case kept (`to_ascii_lowercase` keeps byte offsets).
    address.get(address.len() - orig.len()..).map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strip_tag() {
        let s = sign("Alice@Example.com", 1, b"k", 20_000 * DAY_MS, 7);
        assert_eq!(strip(&s).as_deref(), Some("Alice@Example.com"));
        assert_eq!(strip("PRVS=1007ABCDEF=bob@example.com").as_deref(), Some("bob@example.com"));
        assert_eq!(strip("bob@example.com"), None);
        assert_eq!(strip("prvs=short=bob@example.com"), None);
        assert_eq!(strip("prvs=1007abcdef=@example.com"), None);
        assert_eq!(strip("prvs=\u{e9}007abcdef=b@e"), None);
    }

    #[test]
    fn sign_and_verify() {
        let keys = parse_keys("0 oldsecret\n1 newsecret\n");
        let now = 20_000 * DAY_MS;
        let s = sign("alice@example.com", 1, b"newsecret", now, 7);
        assert!(s.starts_with("prvs=1007"), "{s}");
        assert_eq!(verify(&s, &keys, now, 7), Check::Valid("alice@example.com".into()));
        assert_eq!(verify(&s, &keys, now + 7 * DAY_MS, 7), Check::Valid("alice@example.com".into()));
        assert_eq!(verify(&s, &keys, now + 8 * DAY_MS, 7), Check::Expired);
        let forged = s.replace("alice", "mallory");
        assert_eq!(verify(&forged, &keys, now, 7), Check::BadSignature);
        assert_eq!(verify("alice@example.com", &keys, now, 7), Check::NotSigned);
        assert_eq!(verify(&s, &parse_keys("0 oldsecret"), now, 7), Check::UnknownKey);
        // rotation: mail signed with the old key still verifies while the key is listed
        let old = sign("bob@example.com", 0, b"oldsecret", now, 7);
        assert!(matches!(verify(&old, &keys, now + DAY_MS, 7), Check::Valid(_)));
    }
}
