//! Digests used for certificate fingerprints.

use sha2::{Digest, Sha256};

/// SHA-256 of `bytes`, upper-case hex pairs separated by colons (as `openssl x509
/// -fingerprint -sha256` prints it).
pub fn sha256_fingerprint(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02X}")).collect::<Vec<_>>().join(":")
}

#[cfg(test)]
mod tests {
    #[test]
    fn known() {
        assert!(super::sha256_fingerprint(b"").starts_with("E3:B0:C4:42"));
    }
}
