//! The queue side never panics on a message's bytes: header scanning, the route and bounce
//! stages over the facts built from it, and the DSN that returns it.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    mailpolicy_daemon::fuzzing::queue_message(data);
});
