//! Arbitrary bytes through an SMTP session whose host accepts everything
//! (first input byte: config and reject flags; second: chunking seed).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    mailpolicy_engine::smtp::fuzzing::smtp_commands(data);
});
