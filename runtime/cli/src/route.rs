//! `mailc route [--policy FILE] [--from ADDR] ADDRESS...`: where each address goes, as the
//! queue manager would take it (Exim's `-bt`): the route stage run by the daemon's own code
//! (`daemon::route::route_verdict` over the engine's `routing::RouteRun`, lookups answered
//! by the daemon's `Lookups`), each rewrite, each expansion with its members routed in
//! turn, and the final transport and next hop. Exit codes: 0 every address is delivered
//! somewhere (or discarded by the policy), 1 some address would bounce or be deferred, 2
//! usage or policy errors.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use mailpolicy_daemon::route::{decide, route_verdict, Routed};
use mailpolicy_daemon::{self as daemon, lookup::Lookups, ServeOptions};
use mailpolicy_engine::eval::Effect;
use mailpolicy_engine::record::QueuedMessage;
use mailpolicy_lang::ir::{Program, TransportKind};

/// Expansions within expansions before it is called a loop (the queue manager's bound is
/// the 50 Received: fields a message may gather; 20 levels of lists is more than any).
const MAX_DEPTH: usize = 20;

fn usage(msg: &str) -> u8 {
    eprintln!("mailc route: {msg}\nusage: mailc route [--policy FILE] [--from ADDR] ADDRESS...");
    2
}

pub fn main(args: Vec<OsString>) -> u8 {
    let mut parser = lexopt::Parser::from_args(args);
    let (mut policy, mut from, mut addrs) = (None::<PathBuf>, String::new(), Vec::new());
    loop {
        match parser.next() {
            Ok(Some(lexopt::Arg::Long("policy"))) => match parser.value() {
                Ok(v) => policy = Some(PathBuf::from(v)),
                Err(e) => return usage(&e.to_string()),
            },
            Ok(Some(lexopt::Arg::Long("from"))) => match parser.value().map(|v| v.into_string()) {
                Ok(Ok(v)) => from = v.trim_start_matches('<').trim_end_matches('>').to_string(),
                _ => return usage("--from takes an address"),
            },
            Ok(Some(lexopt::Arg::Value(v))) => match v.into_string() {
                Ok(a) => addrs.push(a),
                Err(_) => return usage("an address is not UTF-8"),
            },
            Ok(Some(other)) => return usage(&format!("unexpected argument {}", other.unexpected())),
            Ok(None) => break,
            Err(e) => return usage(&e.to_string()),
        }
    }
    if addrs.is_empty() {
        return usage("name an address");
    }
    let (prog, dir, lookups, rt) = match daemon_view("route", policy) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let hostname = mailpolicy_engine::config::hostname(&prog, None, &daemon::machine_hostname());
    let local = mailpolicy_engine::conn::local_domains(&prog, &hostname);
    let r = Router { prog: &prog, lookups: &lookups, dir: &dir, local, now: now_ms() };
    let mut ok = true;
    for a in &addrs {
        let mut out = String::new();
        ok &= rt.block_on(r.show(a, &from, 0, &mut Vec::new(), &mut out));
        print!("{out}");
    }
    if ok {
        0
    } else {
        1
    }
}

struct Router<'a> {
    prog: &'a Program,
    lookups: &'a Lookups,
    dir: &'a Path,
    local: Vec<String>,
    now: u64,
}

impl Router<'_> {
    /// Route `address` and write what happens to `out`, indented by `depth`; true when it
    /// is delivered (or discarded), everywhere it expands to.
    async fn show(&self, address: &str, sender: &str, depth: usize, seen: &mut Vec<String>, out: &mut String) -> bool {
        let pad = "  ".repeat(depth);
        out.push_str(&format!("{pad}{address}\n"));
        let key = address.to_ascii_lowercase();
        if seen.contains(&key) || depth > MAX_DEPTH {
            out.push_str(&format!("{pad}  loop: {address} expands to itself; the queue manager defers it\n"));
            return false;
        }
        seen.push(key);
        let msg = QueuedMessage::probe(sender, address, self.local.clone());
        let Some(rcpt) = msg.recipients.first() else { return false };
        let v = route_verdict(self.prog, self.lookups, &msg, rcpt, "ROUTE", self.now, self.now).await;
        let rule = v.decided_by.map(|r| self.prog.describe_loc(r));
        // The steps, in the order the rounds took them.
        let mut current = address.to_string();
        for e in &v.effects {
            match e {
                Effect::RewriteRecipient(a) if !a.eq_ignore_ascii_case(&current) => {
                    out.push_str(&format!("{pad}  rewritten: {current} -> {a}\n"));
                    current = a.clone();
                }
                Effect::RewriteSender(a) => out.push_str(&format!("{pad}  sender rewritten: <{a}>\n")),
                Effect::Masquerade(d) => out.push_str(&format!("{pad}  sender masqueraded as: {}\n", d.join(", "))),
                Effect::Bcc(a) => out.push_str(&format!("{pad}  copy to: {a} (bcc)\n")),
                Effect::Archive(f) => out.push_str(&format!("{pad}  copy to: the archive folder {f}\n")),
                Effect::HeaderAdd { name, .. } => out.push_str(&format!("{pad}  header added: {name}\n")),
                Effect::HeaderReplace { name, .. } => out.push_str(&format!("{pad}  header replaced: {name}\n")),
                Effect::HeaderRemove(name) => out.push_str(&format!("{pad}  header removed: {name}\n")),
                _ => {}
            }
        }
        let by = rule.map(|r| format!(" (by {r})")).unwrap_or_else(|| " (no rule decided: the default)".into());
        match decide(self.prog, self.dir, &msg, rcpt, v, None) {
            Routed::Deliver { key, transport, address: to, sender: new_sender, .. } => {
                out.push_str(&format!("{pad}  transport: {transport}{by}\n"));
                let hop = match transport.kind {
                    TransportKind::Mx => {
                        format!("the MX hosts of {} (looked up at delivery)", mailpolicy_stdlib::address::split(&to).1)
                    }
                    TransportKind::Smtp | TransportKind::Lmtp => transport.dest.clone().unwrap_or_default(),
                    TransportKind::Maildir | TransportKind::Mbox => {
                        let path = key.split_once(':').map(|(_, p)| p).unwrap_or(&key);
                        let path = path.split(" from=").next().unwrap_or(path);
                        let path = path.split(" headers=").next().unwrap_or(path);
                        let kind = if transport.kind == TransportKind::Maildir { "Maildir" } else { "mbox" };
                        format!("the {kind} {}", path.replace("//", "/"))
                    }
                };
                out.push_str(&format!("{pad}  next hop: {hop}\n"));
                if let Some(s) = new_sender {
                    out.push_str(&format!("{pad}  envelope sender: <{s}>\n"));
                }
                true
            }
            Routed::Expand { members, sender: owner } => {
                // The deciding rule is the one after `expand` (the expansion is an effect):
                // not named here.
                out.push_str(&format!("{pad}  expanded into {}: {}\n", members.len(), members.join(", ")));
                if let Some(o) = &owner {
                    out.push_str(&format!("{pad}  envelope sender of the expansion: <{o}>\n"));
                }
                let next_sender = owner.unwrap_or_else(|| sender.to_string());
                let mut ok = true;
                for m in &members {
                    ok &= Box::pin(self.show(m, &next_sender, depth + 1, &mut seen.clone(), out)).await;
                }
                ok
            }
            Routed::Fail(r) => {
                out.push_str(&format!("{pad}  bounces{by}: {}\n", r.line()));
                false
            }
            Routed::Defer(r) => {
                out.push_str(&format!("{pad}  deferred{by}: {}\n", r.line()));
                false
            }
            Routed::Discard => {
                out.push_str(&format!("{pad}  discarded{by}\n"));
                true
            }
            Routed::ExpandList(list) => {
                out.push_str(&format!(
                    "{pad}  the mailing list `{list}`: one copy per confirmed subscriber, each with its VERP sender and List-* headers{by}\n"
                ));
                true
            }
        }
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// The policy as `mailc serve` finds it (`--policy`, else the usual places), checked as the
/// daemon checks it, with the daemon's `Lookups` and a runtime to ask them on: what the
/// commands that answer as the daemon would (`mailc route`, `mailc table query TABLE`)
/// start from. Err(2) after the errors are printed, prefixed `mailc CMD:`.
pub(crate) fn daemon_view(
    cmd: &str,
    policy: Option<PathBuf>,
) -> Result<(Program, PathBuf, Lookups, tokio::runtime::Runtime), u8> {
    let opts =
        ServeOptions { policy: crate::sendmail::policy_path(policy), spool: None, std_dir: crate::check::std_dir() };
    let daemon::Loaded { prog, dir, proven, .. } = match daemon::load_policy(&opts) {
        Ok(x) => x,
        Err(c) => {
            for d in c.diagnostics.iter().filter(|d| d.is_error()) {
                eprintln!("{}", d.render_short(&c.sources));
            }
            eprintln!("mailc {cmd}: the policy has errors");
            return Err(2);
        }
    };
    let lookups = Lookups::new(&prog, &dir, Some(proven)).map_err(|e| {
        eprintln!("mailc {cmd}: {e}");
        2u8
    })?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| {
        eprintln!("mailc {cmd}: {e}");
        2u8
    })?;
    Ok((prog, dir, lookups, rt))
}
