//! The signed tokens of mailing lists (R11, spec/language.md 4.9): a per-subscriber
//! unsubscribe token (in `List-Unsubscribe`, RFC 8058) and an expiring subscription
//! confirmation token (double opt-in), both HMAC-SHA256 with one of the list's `keys`.
//!
//! - unsubscribe: `K.ADDRESS.MAC`, MAC over `unsubscribe`, the list, the address;
//! - confirm: `K.EXPIRY.ADDRESS.MAC`, MAC over `confirm`, the list, the address, EXPIRY.
//!
//! `K` is the key number (the `keys` secret holds `NUMBER KEY` lines, as `batv_keys`: the
//! highest number signs, every listed number verifies, so keys rotate by adding a higher
//! number and removing the old one once its tokens may lapse), `ADDRESS` the subscriber in
//! lower case, base64url, `EXPIRY` Unix seconds, `MAC` the first 16 bytes of the HMAC,
//! base64url. Every part is URL- and Subject-safe (`A-Z a-z 0-9 - _ .`).

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

pub use crate::batv::parse_keys;

/// Bytes of the HMAC a token carries (128 bits).
const MAC_LEN: usize = 16;
/// Longest token accepted (a guard against junk in a URL or a Subject).
pub const MAX_TOKEN: usize = 600;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// A valid token for this address (lower case).
    Valid(String),
    /// A valid confirmation token past its expiry.
    Expired,
    /// Made with a key that is not (or no longer) listed.
    UnknownKey,
    /// Malformed, or a signature that does not verify.
    Bad,
}

fn mac(key: &[u8], parts: &[&str]) -> Option<Hmac<Sha256>> {
    let mut m = Hmac::<Sha256>::new_from_slice(key).ok()?;
    for p in parts {
        m.update(p.as_bytes());
        m.update(&[0]);
    }
    Some(m)
}

fn signing_key(keys: &[(u8, Vec<u8>)]) -> Option<&(u8, Vec<u8>)> {
    keys.iter().max_by_key(|(n, _)| *n)
}

fn tag(key: &[u8], parts: &[&str]) -> String {
    match mac(key, parts) {
        Some(m) => URL_SAFE_NO_PAD.encode(&m.finalize().into_bytes()[..MAC_LEN]),
        None => String::new(),
    }
}

/// The unsubscribe token of `address` on `list`, signed with the newest key; None without keys.
pub fn unsubscribe(list: &str, address: &str, keys: &[(u8, Vec<u8>)]) -> Option<String> {
    let (n, key) = signing_key(keys)?;
    let a = address.to_ascii_lowercase();
    let list = list.to_ascii_lowercase();
    Some(format!("{n}.{}.{}", URL_SAFE_NO_PAD.encode(a.as_bytes()), tag(key, &["unsubscribe", &list, &a])))
}

/// A confirmation token for `address` joining `list`, valid until `expires_s` (Unix seconds).
pub fn confirm(list: &str, address: &str, expires_s: u64, keys: &[(u8, Vec<u8>)]) -> Option<String> {
    let (n, key) = signing_key(keys)?;
    let a = address.to_ascii_lowercase();
    let list = list.to_ascii_lowercase();
    let e = expires_s.to_string();
    Some(format!("{n}.{e}.{}.{}", URL_SAFE_NO_PAD.encode(a.as_bytes()), tag(key, &["confirm", &list, &a, &e])))
}

fn verify_mac(key: &[u8], parts: &[&str], given: &str) -> bool {
    let Ok(given) = URL_SAFE_NO_PAD.decode(given) else { return false };
    if given.len() != MAC_LEN {
        return false;
    }
    // Constant-time comparison of the truncated MAC (hmac's own).
    mac(key, parts).is_some_and(|m| m.verify_truncated_left(&given).is_ok())
}

fn address_of(b64: &str) -> Option<String> {
    let bytes = URL_SAFE_NO_PAD.decode(b64).ok()?;
    let a = String::from_utf8(bytes).ok()?;
    (a.contains('@') && !a.chars().any(|c| c.is_control() || c.is_whitespace()) && a.len() <= 320).then_some(a)
}

fn key_for(keys: &[(u8, Vec<u8>)], n: &str) -> Option<Vec<u8>> {
    let n: u8 = n.parse().ok()?;
    keys.iter().find(|(k, _)| *k == n).map(|(_, v)| v.clone())
}

/// Check an unsubscribe token for `list`.
pub fn verify_unsubscribe(list: &str, token: &str, keys: &[(u8, Vec<u8>)]) -> Check {
    if token.len() > MAX_TOKEN {
        return Check::Bad;
    }
    let parts: Vec<&str> = token.split('.').collect();
    let [n, a, m] = parts.as_slice() else { return Check::Bad };
    let Some(address) = address_of(a) else { return Check::Bad };
    let Some(key) = key_for(keys, n) else { return Check::UnknownKey };
    let list = list.to_ascii_lowercase();
    if address != address.to_ascii_lowercase() {
        return Check::Bad;
    }
    if verify_mac(&key, &["unsubscribe", &list, &address], m) {
        Check::Valid(address)
    } else {
        Check::Bad
    }
}

/// Check a confirmation token for `list` at `now_s` (Unix seconds).
pub fn verify_confirm(list: &str, token: &str, keys: &[(u8, Vec<u8>)], now_s: u64) -> Check {
    if token.len() > MAX_TOKEN {
        return Check::Bad;
    }
    let parts: Vec<&str> = token.split('.').collect();
    let [n, e, a, m] = parts.as_slice() else { return Check::Bad };
    let Ok(expires) = e.parse::<u64>() else { return Check::Bad };
    let Some(address) = address_of(a) else { return Check::Bad };
    let Some(key) = key_for(keys, n) else { return Check::UnknownKey };
    let list = list.to_ascii_lowercase();
    if address != address.to_ascii_lowercase() || !verify_mac(&key, &["confirm", &list, &address, e], m) {
        return Check::Bad;
    }
    if now_s > expires {
        return Check::Expired;
    }
    Check::Valid(address)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> Vec<(u8, Vec<u8>)> {
        parse_keys("1 old-secret\n2 new-secret\n")
    }

    #[test]
    fn unsubscribe_tokens_verify_for_their_address_and_list_only() {
        let t = unsubscribe("news", "Alice@Example.ORG", &keys()).expect("token");
        assert!(t.starts_with("2."), "the newest key signs: {t}");
        assert!(t.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)), "{t}");
        assert_eq!(verify_unsubscribe("news", &t, &keys()), Check::Valid("alice@example.org".into()));
        assert_eq!(verify_unsubscribe("other", &t, &keys()), Check::Bad);
        // Someone else's address with this MAC: refused.
        let parts: Vec<&str> = t.split('.').collect();
        let forged = format!("2.{}.{}", URL_SAFE_NO_PAD.encode("bob@example.org"), parts[2]);
        assert_eq!(verify_unsubscribe("news", &forged, &keys()), Check::Bad);
        // A MAC one bit off: refused.
        let mut mac = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
        mac[0] ^= 1;
        let flipped = format!("{}.{}.{}", parts[0], parts[1], URL_SAFE_NO_PAD.encode(mac));
        assert_eq!(verify_unsubscribe("news", &flipped, &keys()), Check::Bad);
        for junk in ["", "2", "2..", "x.y.z", "2.%%%.abc", &"a".repeat(700)] {
            assert_ne!(verify_unsubscribe("news", junk, &keys()), Check::Valid(String::new()), "{junk}");
            assert!(!matches!(verify_unsubscribe("news", junk, &keys()), Check::Valid(_)), "{junk}");
        }
    }

    #[test]
    fn keys_rotate_old_tokens_verify_until_their_key_is_removed() {
        let old = unsubscribe("news", "a@b.example", &parse_keys("1 old-secret")).unwrap();
        assert_eq!(verify_unsubscribe("news", &old, &keys()), Check::Valid("a@b.example".into()));
        assert_eq!(verify_unsubscribe("news", &old, &parse_keys("2 new-secret")), Check::UnknownKey);
        // The same number with another key: the signature fails.
        assert_eq!(verify_unsubscribe("news", &old, &parse_keys("1 other")), Check::Bad);
    }

    #[test]
    fn confirmation_tokens_expire() {
        let t = confirm("news", "a@b.example", 1_000, &keys()).unwrap();
        assert_eq!(verify_confirm("news", &t, &keys(), 999), Check::Valid("a@b.example".into()));
        assert_eq!(verify_confirm("news", &t, &keys(), 1_001), Check::Expired);
        // A later expiry written into the token breaks the signature.
        let moved = t.replacen(".1000.", ".9999.", 1);
        assert_eq!(verify_confirm("news", &moved, &keys(), 999), Check::Bad);
        // An unsubscribe token is no confirmation, and the reverse.
        let u = unsubscribe("news", "a@b.example", &keys()).unwrap();
        assert_eq!(verify_confirm("news", &u, &keys(), 0), Check::Bad);
        assert_eq!(verify_unsubscribe("news", &t, &keys()), Check::Bad);
        assert_eq!(unsubscribe("news", "a@b.example", &[]), None);
    }
}
