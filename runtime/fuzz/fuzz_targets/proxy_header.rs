//! The PROXY protocol v1/v2 header parser: no panic, prefixes agree with the whole.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    mailpolicy_engine::proxy::fuzz(data);
});
