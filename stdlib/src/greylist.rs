//! Greylisting (B7): the first delivery attempt of an unknown (client network, sender,
//! recipient) triplet is deferred; a retry after `delay` passes and the triplet is then
//! remembered until `expire` passes without mail.

use std::collections::HashMap;

#[derive(Debug, Default)]
pub struct Greylist {
    entries: HashMap<(String, String, String), Entry>,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    first_seen: u64,
    last_seen: u64,
    passed: bool,
}

impl Greylist {
    /// True when the attempt must wait (answer 4xx).
    pub fn check(
        &mut self,
        client: &str,
        sender: &str,
        recipient: &str,
        now_ms: u64,
        delay_ms: u64,
        expire_ms: u64,
    ) -> bool {
        let key = (client.to_ascii_lowercase(), sender.to_ascii_lowercase(), recipient.to_ascii_lowercase());
        let e = self.entries.entry(key).or_insert(Entry { first_seen: now_ms, last_seen: now_ms, passed: false });
        if now_ms.saturating_sub(e.last_seen) > expire_ms {
            *e = Entry { first_seen: now_ms, last_seen: now_ms, passed: false };
        }
        e.last_seen = now_ms;
        if e.passed || now_ms.saturating_sub(e.first_seen) >= delay_ms {
            e.passed = true;
            return false;
        }
        true
    }

    pub fn prune(&mut self, now_ms: u64, expire_ms: u64) {
        self.entries.retain(|_, e| now_ms.saturating_sub(e.last_seen) <= expire_ms);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_defers_retry_passes() {
        let mut g = Greylist::default();
        let (d, x) = (300_000, 86_400_000);
        assert!(g.check("192.0.2.0/24", "a@x", "b@y", 0, d, x));
        assert!(g.check("192.0.2.0/24", "a@x", "b@y", 60_000, d, x));
        assert!(!g.check("192.0.2.0/24", "a@x", "b@y", 400_000, d, x));
        assert!(!g.check("192.0.2.0/24", "a@x", "b@y", 500_000, d, x));
        assert!(g.check("192.0.2.0/24", "a@x", "c@y", 500_000, d, x));
        // forgotten after expiry
        assert!(g.check("192.0.2.0/24", "a@x", "b@y", 500_000 + x + 1, d, x));
    }
}
