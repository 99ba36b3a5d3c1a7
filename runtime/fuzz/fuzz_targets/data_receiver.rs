//! The incremental DATA receiver must equal a simple model for any split.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    mailpolicy_engine::smtp::fuzzing::data_receiver(data);
});
