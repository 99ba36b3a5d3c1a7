//! Any bytes from a milter, cut anywhere, at any stage: the milter client never panics
//! and stays unusable after a protocol error (stable twin: `milter::tests::fuzz_replies_50k`).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    mailpolicy_engine::milter::fuzz_replies(data);
});
