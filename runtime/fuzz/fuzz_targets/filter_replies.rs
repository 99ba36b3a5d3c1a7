//! Any bytes from a before-queue filter, cut anywhere: the filter session never panics,
//! and its outcome, once reached, stands (stable twin: `before_queue::tests::fuzz_replies_20k`).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    mailpolicy_engine::before_queue::fuzz_replies(data);
});
