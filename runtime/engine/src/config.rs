//! Turning a compiled policy's `server { }` and `listener NAME { }` settings into the
//! session engine's configuration. The daemon and `mailc test` both use this, so a
//! transcript runs under exactly the limits the daemon would apply.

use mailpolicy_lang::ir::Program;
use mailpolicy_lang::settings::{Auth, Protocol, Tls};

use crate::smtp;

/// The server's host name: the policy's `hostname` (the listener's, else the server's),
/// else `default`.
pub fn hostname(prog: &Program, listener: Option<&str>, default: &str) -> String {
    let l = prog.listener_or_default(listener);
    l.hostname.clone().or_else(|| prog.server.hostname.clone()).unwrap_or_else(|| default.to_string())
}

/// Engine configuration for a listener (or the server defaults when `listener` is None
/// or not declared). `tls_possible`: the host has a certificate for this listener.
/// Bytes of a message body held in memory in a session, and seen by `body`, `header`
/// and attachment tests (Postfix's `body_checks_size_limit` is 50 KB); DKIM, DMARC and
/// content scanners read the whole message back. The rest streams to the spool.
pub const IN_MEMORY: u64 = 64 << 10;

pub fn engine_config(
    prog: &Program,
    listener: Option<&str>,
    default_hostname: &str,
    tls_possible: bool,
) -> smtp::Config {
    let l = prog.listener_or_default(listener);
    let server = &prog.server;
    let mut c = smtp::Config { hostname: hostname(prog, listener, default_hostname), ..smtp::Config::default() };
    c.greeting = l.banner.clone();
    c.max_message_size = l.max_message_size(server);
    c.max_recipients = l.max_recipients(server) as usize;
    c.max_header_size = server.max_header_size;
    // Memory per session is bounded: past its header section, a message's first
    // IN_MEMORY bytes stay in memory (what body tests see), the rest streams to the host.
    c.max_in_memory = IN_MEMORY;
    // submissions is implicit TLS: no STARTTLS inside
    c.tls_available = tls_possible && l.protocol != Protocol::Submissions && l.tls() != Tls::None;
    if l.auth() != Auth::None && l.credentials.is_some() {
        c.auth_mechanisms = l.auth_mechanisms.iter().map(|s| s.to_ascii_uppercase()).collect();
    }
    c.auth_requires_tls = !l.auth_without_tls;
    c.vrfy_enabled = l.vrfy;
    c.expn_enabled = l.expn;
    c.soft_error_limit = l.soft_error_limit as u32;
    c.hard_error_limit = l.hard_error_limit as u32;
    c.error_sleep = l.error_sleep;
    c
}

/// What a listener requires before MAIL (`tls required`, `auth required`).
pub fn requirements(prog: &Program, listener: Option<&str>) -> (bool, bool) {
    let l = prog.listener_or_default(listener);
    (l.tls() == Tls::Required, l.auth() == Auth::Required)
}
