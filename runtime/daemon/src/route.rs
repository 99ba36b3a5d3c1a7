//! Running the queue-side stages for a stored message: `route` per recipient (which
//! transport and next hop), `deliver` after an attempt, `bounce` before a DSN goes out,
//! `delay` before a delay warning. Requests are answered by the daemon's [`Lookups`].

use std::path::{Path, PathBuf};

use mailpolicy_lang::ir::{Program, Stage, TransportKind};

use super::lookup::Lookups;
use crate::conn::{QueuedMessage, QueuedRcpt};
use crate::eval::{Effect, Facts, Outcome, RenderedTransport, Run, StageVerdict, State, Step};
use crate::record::{stage_facts, InQueue, QueueStage};
use crate::smtp::Reply;

/// Where one recipient goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Routed {
    /// Deliver to `address` (after rewriting) through `transport`; `key` groups recipients
    /// that share a next hop (and so a connection and a concurrency limit). `headers` are
    /// the route stage's header edits for this recipient's copy (`header add/replace/remove`).
    Deliver {
        key: String,
        transport: RenderedTransport,
        address: String,
        sender: Option<String>,
        headers: Vec<crate::headers::Edit>,
        /// A mailing list copy: DKIM-sign it for this domain after the header edits, so the
        /// signature covers List-Unsubscribe and List-Unsubscribe-Post (RFC 8058).
        sign: Option<String>,
    },
    /// `expand LIST` with a mailing list: the post goes to the list's subscribers.
    ExpandList(String),
    /// The recipient is replaced by these addresses (alias or list expansion, redirect);
    /// `sender` is the list owner when the table names one (R39).
    Expand { members: Vec<String>, sender: Option<String> },
    /// Permanent failure (the policy rejected it at route: error transport, R37).
    Fail(Reply),
    /// Temporary failure: try routing again later.
    Defer(Reply),
    /// Dropped by the policy.
    Discard,
}

/// Run one queue-side stage to its verdict.
pub async fn run_stage(
    prog: &Program,
    lookups: &Lookups,
    stage: Stage,
    facts: &Facts,
    state: &mut State,
) -> StageVerdict {
    let mut run = Run::new(prog, stage);
    loop {
        match run.step(prog, facts, state) {
            Step::Need(req) => {
                let a = lookups.answer(prog, &req, facts.now_ms).await;
                run.answer(req, a);
            }
            Step::Done(v) => {
                let rule = v.decided_by.map(|r| prog.describe_loc(r)).unwrap_or_else(|| "default".into());
                crate::metrics::get().verdict(stage.name(), outcome_kind(&v.outcome), &rule);
                return v;
            }
        }
    }
}

/// A queue-side verdict's outcome as a metric label.
fn outcome_kind(o: &crate::eval::Outcome) -> &'static str {
    use crate::eval::Outcome;
    match o {
        Outcome::Default => "default",
        Outcome::Accept => "accept",
        Outcome::Reject(_) => "reject",
        Outcome::Tempfail(_) => "tempfail",
        Outcome::Discard => "discard",
        Outcome::Deliver(_) => "deliver",
    }
}

/// The server's `maildir` root.
pub fn maildir_root(prog: &Program, policy_dir: &Path) -> PathBuf {
    match &prog.server.maildir {
        Some(s) => policy_dir.join(s),
        None => PathBuf::from("var/mail"),
    }
}

/// A destination built with interpolation, confined to the directory its literal prefix
/// names (relative prefixes to the policy's folder): `Err` when it would leave it.
fn confined(policy_dir: &Path, root: &str, dest: &str) -> Result<crate::paths::Confined, crate::paths::Escape> {
    let root = if root.is_empty() { policy_dir.to_path_buf() } else { policy_dir.join(root) };
    let path = policy_dir.join(dest);
    let rel = crate::paths::confine(&root, &path)?;
    let root = crate::paths::normalise(&root);
    Ok(crate::paths::Confined { path: root.join(rel), root: Some(root) })
}

/// The recipient fails for good: its delivery path would leave its directory.
fn escaped(e: &crate::paths::Escape) -> Routed {
    Routed::Fail(Reply::new(550, (5, 7, 1), format!("delivery path refused: {e}")))
}

/// Maildir folder for a local recipient when `deliver maildir` names none:
/// `<maildir root>/<local part>`, the local part made safe for a file name.
pub fn default_maildir(prog: &Program, policy_dir: &Path, address: &str) -> PathBuf {
    let root = maildir_root(prog, policy_dir);
    let local = mailpolicy_stdlib::address::split(address).0.to_ascii_lowercase();
    let local = local.split('+').next().unwrap_or("").to_string();
    let safe: String =
        local.chars().map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) { c } else { '_' }).collect();
    let safe = if safe.is_empty() || safe.starts_with('.') { format!("_{safe}") } else { safe };
    root.join(safe)
}

/// Route recipient `index` of `msg`.
/// A copy the route stage asked for besides the recipient's own delivery (R12).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Copy {
    /// `bcc "ADDRESS"`: also deliver the message to this address.
    Bcc(String),
    /// `archive "FOLDER"`: also store it in this Maildir folder under the server's maildir.
    Archive(String),
}

/// Route recipient `index` of `msg`, with the copies the route stage asked for.
pub async fn route(
    prog: &Program,
    lookups: &Lookups,
    policy_dir: &Path,
    msg: &QueuedMessage,
    index: usize,
    queue_id: &str,
    now_ms: u64,
    arrived_ms: u64,
) -> (Routed, Vec<Copy>) {
    let Some(rcpt) = msg.recipients.get(index) else {
        return (Routed::Fail(Reply::new(550, (5, 1, 1), "no such recipient")), Vec::new());
    };
    let v = route_verdict(prog, lookups, msg, rcpt, queue_id, now_ms, arrived_ms).await;
    let copies = v
        .effects
        .iter()
        .filter_map(|e| match e {
            Effect::Bcc(a) => Some(Copy::Bcc(a.clone())),
            Effect::Archive(f) => Some(Copy::Archive(f.clone())),
            _ => None,
        })
        .collect();
    // A subscriber of a list copy: its VERP sender and its own List-* headers (R11).
    let list = msg.list.as_deref().and_then(|name| crate::lists::by_name(prog, lookups, name)).map(|l| {
        let (verp, edits) = crate::lists::personal(&l, &rcpt.address);
        (verp, edits, l.domain.clone())
    });
    (decide(prog, policy_dir, msg, rcpt, v, list), copies)
}

/// The route stage's verdict for `rcpt` of `msg`, rewritten recipients routed anew (the
/// engine's `routing::RouteRun`): its effects are every round's, in order. `mailc route`
/// shows it; [`decide`] turns it into a [`Routed`].
pub async fn route_verdict(
    prog: &Program,
    lookups: &Lookups,
    msg: &QueuedMessage,
    rcpt: &QueuedRcpt,
    queue_id: &str,
    now_ms: u64,
    arrived_ms: u64,
) -> StageVerdict {
    let at = InQueue { queue_id, now_ms, arrived_ms };
    let (facts, state) = stage_facts(prog, msg, QueueStage::Route(rcpt), at);
    // Rewritten recipients are routed anew, soft_bounce defers the error transport.
    let mut run = crate::routing::RouteRun::new(prog, facts, state);
    let v = loop {
        match run.step(prog) {
            Step::Need(req) => {
                let a = lookups.answer(prog, &req, now_ms).await;
                run.answer(req, a);
            }
            Step::Done(v) => break v,
        }
    };
    let rule = v.decided_by.map(|r| prog.describe_loc(r)).unwrap_or_else(|| "default".into());
    crate::metrics::get().verdict(Stage::Route.name(), outcome_kind(&v.outcome), &rule);
    v
}

/// What the route stage's verdict means for the recipient: its transport and next hop, an
/// expansion, a failure, a deferral or a discard.
/// `list`: for a subscriber of a mailing-list copy, its VERP sender, its own List-* headers
/// and the list's signing domain (R11).
pub fn decide(
    prog: &Program,
    policy_dir: &Path,
    msg: &QueuedMessage,
    rcpt: &QueuedRcpt,
    v: StageVerdict,
    list: Option<(String, Vec<crate::headers::Edit>, String)>,
) -> Routed {
    let mut address = rcpt.address.clone();
    let mut sender: Option<String> = None;
    let mut headers = Vec::new();
    for e in &v.effects {
        match e {
            Effect::HeaderAdd { name, value } => headers.push(crate::headers::Edit::Add(name.clone(), value.clone())),
            Effect::HeaderReplace { name, value } => {
                headers.push(crate::headers::Edit::Replace(name.clone(), value.clone()))
            }
            Effect::HeaderRemove(name) => headers.push(crate::headers::Edit::Remove(name.clone())),
            Effect::RewriteSender(a) => sender = Some(a.clone()),
            Effect::Masquerade(domains) => {
                let cur = sender.clone().unwrap_or_else(|| msg.sender.clone());
                if let Some(m) = masquerade(&cur, domains) {
                    sender = Some(m);
                }
            }
            Effect::Expand { members, owner } => {
                return Routed::Expand { members: members.clone(), sender: owner.clone() }
            }
            Effect::Redirect(to) => return Routed::Expand { members: vec![to.clone()], sender: None },
            Effect::ExpandList(name) => return Routed::ExpandList(name.clone()),
            Effect::RewriteRecipient(a) => address = a.clone(),
            _ => {}
        }
    }
    // A list copy goes out with the subscriber's VERP sender and List-* headers, whatever
    // the route stage rewrote: each bounce must name its subscriber.
    let mut sign = None;
    if let Some((verp, edits, domain)) = list {
        sender = Some(verp);
        headers.extend(edits);
        sign = Some(domain);
    }
    let transport = match v.outcome {
        Outcome::Reject(r) => return Routed::Fail(r),
        Outcome::Tempfail(r) => return Routed::Defer(r),
        Outcome::Discard => return Routed::Discard,
        Outcome::Deliver(t) => t,
        // Falling off the end of route: deliver by MX (spec/language.md section 11).
        Outcome::Default | Outcome::Accept => RenderedTransport {
            kind: TransportKind::Mx,
            dest: None,
            tls: mailpolicy_lang::ir::TlsMode::May,
            auth: None,
            ca: None,
            cert: None,
            root: None,
        },
    };
    let domain = mailpolicy_stdlib::address::split(&address).1;
    let key = match transport.kind {
        TransportKind::Mx => format!("mx:{domain}"),
        TransportKind::Smtp => format!("smtp:{}", transport.dest.clone().unwrap_or_default().to_ascii_lowercase()),
        TransportKind::Lmtp => {
            let dest = transport.dest.clone().unwrap_or_default();
            match (dest.strip_prefix("unix:"), &transport.root) {
                (Some(path), Some(root)) => match confined(policy_dir, root, path) {
                    // A socket path is connected to, not walked: it must stay under its root.
                    Ok(c) => format!("lmtp:unix:{}", c.path.display()),
                    Err(e) => return escaped(&e),
                },
                _ => format!("lmtp:{dest}"),
            }
        }
        TransportKind::Maildir => {
            let c = match (&transport.dest, &transport.root) {
                (Some(d), Some(root)) => match confined(policy_dir, root, d) {
                    Ok(c) => c,
                    Err(e) => return escaped(&e),
                },
                (Some(d), None) => crate::paths::Confined { root: None, path: policy_dir.join(d) },
                (None, _) => {
                    let root = maildir_root(prog, policy_dir);
                    let path = default_maildir(prog, policy_dir, &address);
                    crate::paths::Confined { root: Some(root), path }
                }
            };
            format!("maildir:{}", c.key())
        }
        TransportKind::Mbox => match (&transport.dest, &transport.root) {
            (Some(d), Some(root)) => match confined(policy_dir, root, d) {
                Ok(c) => format!("mbox:{}", c.key()),
                Err(e) => return escaped(&e),
            },
            (d, _) => format!("mbox:{}", policy_dir.join(d.clone().unwrap_or_default()).display()),
        },
    };
    // Sessions (and the scheduler's destinations) are kept apart by how they are secured.
    let key = match (transport.tls, &transport.ca) {
        (mailpolicy_lang::ir::TlsMode::Required, Some(ca)) => format!("{key} tls ca={ca}"),
        (mailpolicy_lang::ir::TlsMode::Required, None) => format!("{key} tls"),
        (mailpolicy_lang::ir::TlsMode::Implicit, Some(ca)) => format!("{key} tls implicit ca={ca}"),
        (mailpolicy_lang::ir::TlsMode::Implicit, None) => format!("{key} tls implicit"),
        (mailpolicy_lang::ir::TlsMode::Dane, Some(ca)) => format!("{key} tls dane ca={ca}"),
        (mailpolicy_lang::ir::TlsMode::Dane, None) => format!("{key} tls dane"),
        (mailpolicy_lang::ir::TlsMode::Sts, Some(ca)) => format!("{key} tls sts ca={ca}"),
        (mailpolicy_lang::ir::TlsMode::Sts, None) => format!("{key} tls sts"),
        _ => key,
    };
    let key = match &transport.cert {
        Some((c, _)) => format!("{key} cert={c}"),
        None => key,
    };
    // Recipients with a rewritten sender travel in envelopes of their own.
    let key = match &sender {
        Some(s) => format!("{key} from={s}"),
        None => key,
    };
    // So do recipients whose copy the route stage edited: one message text per envelope.
    let key = if headers.is_empty() { key } else { format!("{key} headers={:016x}", edits_digest(&headers)) };
    Routed::Deliver { key, transport, address, sender, headers, sign }
}

/// A digest of header edits that stays the same across restarts (FNV-1a), so recipients
/// with the same edits share an envelope and the grouping key is stable.
fn edits_digest(edits: &[crate::headers::Edit]) -> u64 {
    use crate::headers::Edit;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |b: &[u8]| {
        for x in b.iter().chain([0u8].iter()) {
            h ^= u64::from(*x);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    for e in edits {
        match e {
            Edit::Add(n, v) => {
                eat(b"add");
                eat(n.as_bytes());
                eat(v.as_bytes());
            }
            Edit::Replace(n, v) => {
                eat(b"replace");
                eat(n.as_bytes());
                eat(v.as_bytes());
            }
            Edit::Remove(n) => {
                eat(b"remove");
                eat(n.as_bytes());
            }
            Edit::Append(n, v) => {
                eat(b"append");
                eat(n.as_bytes());
                eat(v.as_bytes());
            }
            Edit::Insert(i, n, v) | Edit::Change(i, n, v) => {
                eat(if matches!(e, Edit::Insert(..)) { b"insert" } else { b"change" });
                eat(&i.to_be_bytes());
                eat(n.as_bytes());
                eat(v.as_bytes());
            }
        }
    }
    h
}

/// `user@host.sub.example.com` -> `user@example.com` when `example.com` is listed (R38).
pub fn masquerade(address: &str, domains: &[String]) -> Option<String> {
    let (local, domain) = mailpolicy_stdlib::address::split(address);
    let d = domains.iter().find(|d| domain.len() > d.len() && domain.ends_with(&format!(".{d}")))?;
    Some(format!("{local}@{d}"))
}

/// The route for a message that passes through a content filter first (R44): every
/// recipient goes to the filter, which re-injects the message.
pub fn filter_route(t: &RenderedTransport, address: &str) -> Routed {
    let dest = t.dest.clone().unwrap_or_default();
    let kind = if t.kind == TransportKind::Lmtp { "lmtp" } else { "smtp" };
    Routed::Deliver {
        key: format!("{kind}:{}", dest.to_ascii_lowercase()),
        transport: t.clone(),
        address: address.to_string(),
        sender: None,
        headers: Vec::new(),
        sign: None,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn masquerading() {
        let d = vec!["example.com".to_string()];
        assert_eq!(super::masquerade("joe@mail.example.com", &d).as_deref(), Some("joe@example.com"));
        assert_eq!(super::masquerade("joe@example.com", &d), None);
        assert_eq!(super::masquerade("joe@badexample.com", &d), None);
    }
}

/// The bounce stage for a DSN to `to`: false when the policy drops it (R3c).
pub async fn bounce_allowed(
    prog: &Program,
    lookups: &Lookups,
    msg: &QueuedMessage,
    to: &str,
    kind: &str,
    reason: &str,
    now_ms: u64,
    queue_id: &str,
    arrived_ms: u64,
) -> (bool, Vec<Effect>) {
    let at = InQueue { queue_id, now_ms, arrived_ms };
    let (facts, mut state) = stage_facts(prog, msg, QueueStage::Bounce { to, kind, reason }, at);
    let v = run_stage(prog, lookups, Stage::Bounce, &facts, &mut state).await;
    (v.outcome != Outcome::Discard, v.effects)
}

/// The delay stage: false when the policy suppresses the warning.
pub async fn delay_warning_allowed(
    prog: &Program,
    lookups: &Lookups,
    msg: &QueuedMessage,
    now_ms: u64,
    queue_id: &str,
    arrived_ms: u64,
) -> bool {
    let (facts, mut state) = stage_facts(prog, msg, QueueStage::Delay, InQueue { queue_id, now_ms, arrived_ms });
    run_stage(prog, lookups, Stage::Delay, &facts, &mut state).await.outcome != Outcome::Discard
}

/// The deliver stage after an attempt: the policy may keep the result (None) or replace
/// it by a deferral or a permanent failure (e.g. soft-bounce a 5xx, R40).
pub async fn after_attempt(
    prog: &Program,
    lookups: &Lookups,
    msg: &QueuedMessage,
    rcpt: &QueuedRcpt,
    delivery: crate::eval::DeliveryFacts,
    now_ms: u64,
    queue_id: &str,
    arrived_ms: u64,
) -> Option<Outcome> {
    if prog.stage(Stage::Deliver).is_empty() {
        return None;
    }
    let at = InQueue { queue_id, now_ms, arrived_ms };
    let (facts, mut state) = stage_facts(prog, msg, QueueStage::Deliver(rcpt, delivery), at);
    let v = run_stage(prog, lookups, Stage::Deliver, &facts, &mut state).await;
    match v.outcome {
        o @ (Outcome::Reject(_) | Outcome::Tempfail(_)) => Some(o),
        _ => None,
    }
}
