//! Sliding-window event counters for `rate` and `concurrent` (R7, R22).
//!
//! Each (counter, key) keeps the timestamps of its events within the longest window any
//! policy asks about (one day by default); a count is the number of events in the window.
//! Memory is bounded: a key keeps at most `max_events` timestamps (older ones are dropped,
//! which can only undercount beyond that many events, far past any sane limit).

use std::collections::{HashMap, VecDeque};

#[derive(Debug)]
pub struct RateStore {
    /// By counter, then by key (lower case): looked up by `&str`, with no key built.
    events: HashMap<String, HashMap<String, VecDeque<u64>>>,
    concurrent: HashMap<String, u64>,
    /// Events older than this are forgotten.
    pub horizon_ms: u64,
    pub max_events: usize,
}

impl Default for RateStore {
    fn default() -> RateStore {
        RateStore { events: HashMap::new(), concurrent: HashMap::new(), horizon_ms: 86_400_000, max_events: 100_000 }
    }
}

impl RateStore {
    /// Record one event of `counter` for `key` at `now_ms`.
    pub fn record(&mut self, counter: &str, key: &str, now_ms: u64) {
        if !self.events.contains_key(counter) {
            self.events.insert(counter.to_string(), HashMap::new());
        }
        let Some(keys) = self.events.get_mut(counter) else { return };
        let key = lower(key);
        if !keys.contains_key(key.as_ref()) {
            keys.insert(key.to_string(), VecDeque::new());
        }
        let Some(q) = keys.get_mut(key.as_ref()) else { return };
        // Kept in time order (a clock that stepped back inserts in place), so a count is a
        // binary search, not a walk over every event in the window.
        if q.back().is_some_and(|t| *t > now_ms) {
            let at = q.partition_point(|t| *t <= now_ms);
            q.insert(at, now_ms);
        } else {
            q.push_back(now_ms);
        }
        while q.len() > self.max_events {
            q.pop_front();
        }
        let horizon = now_ms.saturating_sub(self.horizon_ms);
        while q.front().is_some_and(|t| *t < horizon) {
            q.pop_front();
        }
    }

    /// Events of `counter` for `key` in the `window_ms` ending at `now_ms` (inclusive). A
    /// window longer than the horizon counts the horizon: the events kept (the shared
    /// store answers the same, spec/language.md 5.3).
    pub fn count(&self, counter: &str, key: &str, window_ms: u64, now_ms: u64) -> u64 {
        let window_ms = window_ms.min(self.horizon_ms);
        let start = now_ms.saturating_sub(window_ms);
        self.events
            .get(counter)
            .and_then(|keys| keys.get(lower(key).as_ref()))
            .map(|q| if now_ms < window_ms { q.len() } else { q.len() - q.partition_point(|t| *t <= start) } as u64)
            .unwrap_or(0)
    }

    pub fn open(&mut self, key: &str) {
        *self.concurrent.entry(key.to_ascii_lowercase()).or_default() += 1;
    }

    pub fn close(&mut self, key: &str) {
        let k = key.to_ascii_lowercase();
        if let Some(n) = self.concurrent.get_mut(&k) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.concurrent.remove(&k);
            }
        }
    }

    pub fn concurrent(&self, key: &str) -> u64 {
        self.concurrent.get(&key.to_ascii_lowercase()).copied().unwrap_or(0)
    }

    /// The keys with open sessions, and how many each (the shared store republishes them).
    pub fn open_counts(&self) -> impl Iterator<Item = (&str, u64)> {
        self.concurrent.iter().map(|(k, n)| (k.as_str(), *n))
    }

    /// Drop keys with no event inside the horizon.
    pub fn prune(&mut self, now_ms: u64) {
        let horizon = now_ms.saturating_sub(self.horizon_ms);
        self.events.retain(|_, keys| {
            keys.retain(|_, q| q.back().is_some_and(|t| *t >= horizon));
            !keys.is_empty()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_agree_with_a_walk_over_every_event() {
        let mut r = RateStore::default();
        let mut all = Vec::new();
        let mut t = 1_000_000u64;
        for i in 0..5000u64 {
            // Mostly forward, sometimes a step back (a clock adjusted).
            t = if i % 97 == 0 { t - 3_000 } else { t + (i * 7919) % 50 };
            r.record("c", "k", t);
            all.push(t);
            if i % 37 == 0 {
                for w in [0u64, 1, 1_000, 60_000, 2_000_000] {
                    let start = t.saturating_sub(w);
                    let want = all.iter().filter(|x| **x > start || t < w).count() as u64;
                    assert_eq!(r.count("c", "K", w, t), want, "i={i} window={w}");
                }
            }
        }
    }

    #[test]
    fn a_window_longer_than_the_horizon_counts_the_horizon() {
        let mut r = RateStore { horizon_ms: 10_000, ..RateStore::default() };
        for t in [100_000, 105_000, 109_000] {
            r.record("c", "k", t);
        }
        // At 112,000 the horizon reaches back to 102,000: two events, whatever the window.
        assert_eq!(r.count("c", "k", 1_000_000, 112_000), 2);
        assert_eq!(r.count("c", "k", 10_000, 112_000), 2);
        assert_eq!(r.count("c", "k", 5_000, 112_000), 1);
    }

    #[test]
    fn window() {
        let mut r = RateStore::default();
        for t in [0, 10_000, 20_000, 70_000] {
            r.record("messages", "192.0.2.1", t);
        }
        assert_eq!(r.count("messages", "192.0.2.1", 60_000, 70_000), 2);
        assert_eq!(r.count("messages", "192.0.2.1", 3_600_000, 70_000), 4);
        assert_eq!(r.count("messages", "192.0.2.2", 60_000, 70_000), 0);
        r.open("x");
        r.open("X");
        assert_eq!(r.concurrent("x"), 2);
        r.close("x");
        assert_eq!(r.concurrent("x"), 1);
    }
}

/// `key` in ASCII lower case, borrowed when it is already (the evaluator's keys are).
fn lower(key: &str) -> std::borrow::Cow<'_, str> {
    if key.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(key.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(key)
    }
}
