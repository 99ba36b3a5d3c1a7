//! Fault injection for the daemon's own end-to-end tests of its last lines of defence (the
//! supervised queue manager, the session guards). Only in debug builds, and only when the
//! environment says so: `MAILPOLICY_FAULT=POINT:MARKER[,POINT:MARKER...]` makes `POINT`
//! panic on a message whose data contains `MARKER`. Release builds never read it.
//!
//! Points: `qmgr-admit` (routing a message, inside the per-message boundary),
//! `qmgr-task` (the queue manager's own loop, outside it), `delivery` (a delivery task),
//! `session` (an SMTP session, when the message is to be stored).

/// The marker armed for `point`, if any.
pub fn armed(point: &str) -> Option<String> {
    if !cfg!(debug_assertions) {
        return None;
    }
    let spec = std::env::var("MAILPOLICY_FAULT").ok()?;
    spec.split(',').find_map(|one| {
        let (p, marker) = one.split_once(':')?;
        (p == point && !marker.is_empty()).then(|| marker.to_string())
    })
}

/// Panic when `point` is armed for a marker that `data` contains.
pub fn check(point: &str, data: &[u8]) {
    if let Some(marker) = armed(point) {
        if data.windows(marker.len()).any(|w| w == marker.as_bytes()) {
            panic!("fault injection at {point}");
        }
    }
}
