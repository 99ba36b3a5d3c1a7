//! Turning a compiled policy's `server { }` and `listener NAME { }` settings into the
//! session engine's configuration. The daemon and `mailc test` both use this, so a
//! transcript runs under exactly the limits the daemon would apply.

use std::time::Duration;

use mailpolicy_lang::ir::{OptValue, Program, Settings};

use crate::smtp;

fn opt<'a>(listener: Option<&'a Settings>, server: &'a Settings, name: &str) -> Option<&'a OptValue> {
    listener.and_then(|l| l.option(name)).or_else(|| server.option(name))
}

fn num(v: Option<&OptValue>) -> Option<u64> {
    match v {
        Some(OptValue::Num(n)) => Some(*n as u64),
        Some(OptValue::Size(n)) | Some(OptValue::Duration(n)) => Some(*n),
        _ => None,
    }
}

fn word<'a>(v: Option<&'a OptValue>) -> Option<&'a str> {
    match v {
        Some(OptValue::Word(w)) => Some(w.as_str()),
        _ => None,
    }
}

fn flag(v: Option<&OptValue>) -> Option<bool> {
    match v {
        Some(OptValue::Bool(b)) => Some(*b),
        _ => None,
    }
}

/// The server's host name: the policy's `hostname`, else `default`.
pub fn hostname(prog: &Program, listener: Option<&str>, default: &str) -> String {
    let l = listener.and_then(|n| prog.listener(n));
    match opt(l, &prog.server, "hostname") {
        Some(OptValue::Str(s)) => s.clone(),
        _ => default.to_string(),
    }
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
    let l = listener.and_then(|n| prog.listener(n));
    let server = &prog.server;
    let mut c = smtp::Config { hostname: hostname(prog, listener, default_hostname), ..smtp::Config::default() };
    if let Some(OptValue::Str(b)) = opt(l, server, "banner") {
        c.greeting = b.clone();
    }
    c.max_message_size = num(opt(l, server, "max_message_size")).unwrap_or(25 << 20);
    if let Some(n) = num(opt(l, server, "max_recipients")) {
        c.max_recipients = n as usize;
    }
    if let Some(n) = num(server.option("max_header_size")) {
        c.max_header_size = n;
    }
    // Memory per session is bounded: past its header section, a message's first
    // IN_MEMORY bytes stay in memory (what body tests see), the rest streams to the host.
    c.max_in_memory = IN_MEMORY;
    let protocol = word(l.and_then(|l| l.option("protocol"))).unwrap_or("smtp");
    let tls = word(l.and_then(|l| l.option("tls"))).unwrap_or(match protocol {
        "submissions" => "none", // implicit TLS: no STARTTLS inside
        _ => "starttls",
    });
    c.tls_available = tls_possible && protocol != "submissions" && tls != "none";
    let auth = word(l.and_then(|l| l.option("auth"))).unwrap_or(match protocol {
        "submission" | "submissions" => "required",
        _ => "none",
    });
    let has_credentials = l.and_then(|l| l.option("credentials")).is_some();
    if auth != "none" && has_credentials {
        c.auth_mechanisms = match l.and_then(|l| l.option("auth_mechanisms")) {
            Some(OptValue::List(m)) => m.iter().map(|s| s.to_ascii_uppercase()).collect(),
            _ => vec!["SCRAM-SHA-256".into(), "PLAIN".into(), "LOGIN".into()],
        };
    }
    c.auth_requires_tls = !flag(l.and_then(|l| l.option("auth_without_tls"))).unwrap_or(false);
    c.vrfy_enabled = flag(l.and_then(|l| l.option("vrfy"))).unwrap_or(false);
    c.expn_enabled = flag(l.and_then(|l| l.option("expn"))).unwrap_or(false);
    if let Some(n) = num(l.and_then(|l| l.option("soft_error_limit"))) {
        c.soft_error_limit = n as u32;
    }
    if let Some(n) = num(l.and_then(|l| l.option("hard_error_limit"))) {
        c.hard_error_limit = n as u32;
    }
    if let Some(ms) = num(l.and_then(|l| l.option("error_sleep"))) {
        c.error_sleep = Duration::from_millis(ms);
    }
    c
}

/// What a listener requires before MAIL (`tls required`, `auth required`).
pub fn requirements(prog: &Program, listener: Option<&str>) -> (bool, bool) {
    let l = listener.and_then(|n| prog.listener(n));
    let protocol = word(l.and_then(|l| l.option("protocol"))).unwrap_or("smtp");
    let tls = word(l.and_then(|l| l.option("tls"))) == Some("required");
    let auth = word(l.and_then(|l| l.option("auth"))).unwrap_or(match protocol {
        "submission" | "submissions" => "required",
        _ => "none",
    }) == "required";
    (tls, auth)
}
