//! `mailc::open-list`: a mailing list anyone can post to (spec/language.md 16, R11).
//!
//! The open-relay proof does not follow `expand LIST`: a post to a list is mail to a local
//! address, which the proof rightly calls safe, yet it goes out to every subscriber. This
//! lint asks, for every `expand LIST` of the route stage and each address that reaches it,
//! whether a stranger can post: an **anonymous outsider** (not authenticated, no client
//! certificate, a client address in none of the policy's networks or lists, a sender in
//! none of its lists and equal to none of its literals, and a free choice of everything
//! else: HELO, TLS, headers, body, DNS reputation) sending to that address on each SMTP
//! listener that lets such a client send mail (not `auth required`, not `client_certs
//! require`). The list is restricted on a listener when some refusal (`reject`,
//! `tempfail`, `discard`, `reject_callahead`) in `connect`, `helo`, `mail`, `rcpt` or
//! `data` is certain to refuse that outsider: every condition on its path holds whatever
//! the outsider chooses (three-valued: the outsider's free choices are unknown, and
//! unknown is not enough), and no `accept` or `stop` before it in its stage might let the
//! outsider through first. Falling off the end of `rcpt` is such a refusal when the
//! address is outside `local_domains` and `relay_domains` (the built-in relay rule).
//!
//! Sound in the direction that matters: no warning means every listener refuses that
//! outsider for sure. A restriction by the envelope sender counts (the outsider does not
//! forge), so the lint does not judge how strong a restriction is; tests it cannot decide
//! (a table of recipients, a regex on a free value, a variable) count as unknown, which may
//! warn about a policy that is in fact closed: write the list's address as a literal in the
//! rule that guards it.

use crate::diag::Diagnostic;
use crate::ir::*;
use crate::settings::{Auth, ClientCerts, Protocol};
use crate::source::SourceMap;

use super::lint::extent;
use super::loc_span;

/// Three-valued truth: the outsider's free choices are `U`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Tri {
    T,
    F,
    U,
}

impl Tri {
    fn of(b: bool) -> Tri {
        if b {
            Tri::T
        } else {
            Tri::F
        }
    }
    fn not(self) -> Tri {
        match self {
            Tri::T => Tri::F,
            Tri::F => Tri::T,
            Tri::U => Tri::U,
        }
    }
}

/// The post under consideration: the address posted to, on one listener (None: the
/// default listener, whose name a policy cannot test for).
struct Post<'a> {
    prog: &'a Program,
    address: String,
    local: String,
    domain: String,
    listener: Option<&'a str>,
}

/// What the outsider's value of a fact is, when the lint knows it.
enum Known {
    /// A string the lint knows (the recipient's parts, the empty login).
    Str(String),
    /// Some string the policy names nowhere (the outsider's sender, client address).
    Stranger,
    /// The recipients of a post to the list alone (the outsider may add others).
    Recipients(String),
    Free,
}

impl Post<'_> {
    fn value(&self, v: &Val) -> Known {
        match v {
            Val::Fact(Fact::Recipient) => Known::Str(self.address.clone()),
            Val::Fact(Fact::RecipientLocal) => Known::Str(self.local.clone()),
            Val::Fact(Fact::RecipientDomain) => Known::Str(self.domain.clone()),
            Val::Fact(Fact::RecipientDetail) => Known::Str(String::new()),
            Val::Fact(Fact::AuthUser | Fact::AuthMechanism | Fact::TlsClientFingerprint) => Known::Str(String::new()),
            Val::Fact(Fact::Listener) => match self.listener {
                Some(l) => Known::Str(l.to_string()),
                None => Known::Free,
            },
            Val::Fact(Fact::Sender | Fact::SenderLocal | Fact::SenderDomain | Fact::ClientIp) => Known::Stranger,
            Val::Fact(Fact::Recipients) => Known::Recipients(self.address.clone()),
            Val::Lit(s) => Known::Str(self.prog.str(*s).to_string()),
            _ => Known::Free,
        }
    }

    fn literals(&self, rhs: &[Template]) -> Option<Vec<String>> {
        rhs.iter()
            .map(|t| match t.0.as_slice() {
                [Part::Lit(s)] => Some(self.prog.str(*s).to_string()),
                [] => Some(String::new()),
                _ => None,
            })
            .collect()
    }

    fn in_set(&self, value: &str, set: &SetRef) -> Tri {
        match set {
            SetRef::Strings(items) => Tri::of(items.iter().any(|s| self.prog.str(*s).eq_ignore_ascii_case(value))),
            SetRef::List(id) => match self.prog.lists.get(id.index()) {
                Some(l) => match l.kind {
                    ListKind::Strings => Tri::of(l.items.iter().any(|i| i.eq_ignore_ascii_case(value))),
                    ListKind::Domains => {
                        let d = value.rsplit_once('@').map(|(_, d)| d).unwrap_or(value);
                        Tri::of(l.items.iter().any(|i| crate::address::domain_matches(i, d)))
                    }
                    ListKind::Cidr => Tri::F,
                },
                None => Tri::U,
            },
            SetRef::Nets(_) => Tri::F,
            // The table's rows are not read here.
            SetRef::Table(_) => Tri::U,
        }
    }

    fn eval(&self, id: ExprId) -> Tri {
        match self.prog.expr(id) {
            Expr::Const(b) => Tri::of(*b),
            Expr::Not(i) => self.eval(*i).not(),
            // Kleene: `a and b` is `not (not a or not b)`.
            Expr::All(ids) => ids.iter().map(|i| self.eval(*i).not()).fold(Tri::F, or).not(),
            Expr::Any(ids) => ids.iter().map(|i| self.eval(*i)).fold(Tri::F, or),
            Expr::Truth(Val::Fact(f)) => match f {
                Fact::True => Tri::T,
                Fact::False | Fact::Authenticated | Fact::TlsClientCert => Tri::F,
                Fact::RecipientRouting => Tri::of(crate::address::has_routing(&self.local)),
                Fact::RecipientIsLocal => self.is_local(),
                _ => Tri::U,
            },
            Expr::LoginMismatch(_) => Tri::F,
            Expr::Match { lhs, op, rhs } => {
                let Some(lits) = self.literals(rhs) else { return Tri::U };
                let hit = |v: &str| {
                    lits.iter().any(|l| match op {
                        MatchOp::Is => v.eq_ignore_ascii_case(l),
                        MatchOp::Contains => v.to_ascii_lowercase().contains(&l.to_ascii_lowercase()),
                    })
                };
                match self.value(lhs) {
                    Known::Str(v) => Tri::of(hit(&v)),
                    // The outsider's sender equals none of the policy's literals (but may be
                    // the null sender, or contain anything).
                    Known::Stranger if *op == MatchOp::Is && lits.iter().all(|l| !l.is_empty()) => Tri::F,
                    Known::Recipients(a) if hit(&a) => Tri::T,
                    _ => Tri::U,
                }
            }
            Expr::Pattern { lhs, pats } => match self.value(lhs) {
                Known::Str(v) => Tri::of(
                    pats.iter().any(|p| self.prog.patterns.get(p.index()).is_some_and(|p| p.regex.is_match(&v))),
                ),
                _ => Tri::U,
            },
            Expr::In { lhs, set } => match self.value(lhs) {
                Known::Str(v) => self.in_set(&v, set),
                Known::Stranger => Tri::F,
                Known::Recipients(a) if self.in_set(&a, set) == Tri::T => Tri::T,
                _ => Tri::U,
            },
            _ => Tri::U,
        }
    }

    /// `recipient.is_local`: the address's domain is one of `local_domains` (unknown
    /// without them: the default is the machine's hostname).
    fn is_local(&self) -> Tri {
        match self.prog.server.local_domains {
            Some(id) => self.in_set(&self.domain, &SetRef::List(id)),
            None => Tri::U,
        }
    }

    /// Whether the built-in relay rule refuses the address at the end of `rcpt`.
    fn relay_rule_refuses(&self) -> bool {
        let lists = [self.prog.server.local_domains, self.prog.server.relay_domains];
        self.prog.server.local_domains.is_some()
            && lists.iter().flatten().all(|id| self.in_set(&self.domain, &SetRef::List(*id)) == Tri::F)
    }
}

/// The conditions an instruction sits under: (condition, whether it holds there).
fn paths(code: &[Instr]) -> Vec<Vec<(ExprId, bool)>> {
    let mut out = vec![Vec::new(); code.len()];
    for (pc, instr) in code.iter().enumerate() {
        let Instr::If { cond, else_pc, .. } = instr else { continue };
        let (else_at, end) = extent(code, pc);
        let then_end = (*else_pc as usize).min(else_at);
        for (i, p) in out.iter_mut().enumerate().take(end.min(code.len())).skip(pc + 1) {
            if i < then_end {
                p.push((*cond, true));
            } else if i >= else_at {
                p.push((*cond, false));
            }
        }
    }
    out
}

/// Kleene's or.
fn or(a: Tri, b: Tri) -> Tri {
    match (a, b) {
        (Tri::T, _) | (_, Tri::T) => Tri::T,
        (Tri::U, _) | (_, Tri::U) => Tri::U,
        _ => Tri::F,
    }
}

/// Whether every condition on `path` holds as it must there.
fn holds(post: &Post, path: &[(ExprId, bool)]) -> Tri {
    path.iter().map(|(c, pol)| if *pol { post.eval(*c).not() } else { post.eval(*c) }).fold(Tri::F, or).not()
}

/// Whether some stage certainly refuses the outsider's post.
fn refused(post: &Post) -> bool {
    for stage in [Stage::Connect, Stage::Helo, Stage::Mail, Stage::Rcpt, Stage::Data] {
        let code = post.prog.stage(stage);
        let paths = paths(code);
        for (pc, instr) in code.iter().enumerate() {
            let Instr::Do { action, .. } = instr else { continue };
            match action {
                // Something before might let the outsider through: later refusals do not
                // count.
                Action::Accept | Action::Stop => {
                    if holds(post, &paths[pc]) != Tri::F {
                        break;
                    }
                }
                Action::Reject(_) | Action::Tempfail(_) | Action::RejectCallahead | Action::Discard => {
                    if holds(post, &paths[pc]) == Tri::T {
                        return true;
                    }
                }
                _ => {}
            }
        }
        if stage == Stage::Rcpt && post.relay_rule_refuses() {
            // Falling off the end, if nothing accepted before: the built-in relay rule.
            let accepted = code.iter().enumerate().any(|(pc, i)| {
                matches!(i, Instr::Do { action: Action::Accept | Action::Stop, .. })
                    && holds(post, &paths[pc]) != Tri::F
            });
            if !accepted {
                return true;
            }
        }
    }
    false
}

/// The addresses that reach the `expand` at `pc` of the route stage: the literals a
/// `recipient :is` (or `recipient in [...]`) on its path allows, else the list's own.
fn posting_addresses(prog: &Program, path: &[(ExprId, bool)], own: &str) -> Vec<String> {
    let mut found: Option<Vec<String>> = None;
    for (c, pol) in path {
        if !*pol {
            continue;
        }
        let mut conj = vec![*c];
        while let Some(e) = conj.pop() {
            match prog.expr(e) {
                Expr::All(ids) => conj.extend(ids.iter().copied()),
                Expr::Match { lhs: Val::Fact(Fact::Recipient), op: MatchOp::Is, rhs } => {
                    let lits: Option<Vec<String>> = rhs
                        .iter()
                        .map(|t| match t.0.as_slice() {
                            [Part::Lit(s)] => Some(prog.str(*s).to_ascii_lowercase()),
                            _ => None,
                        })
                        .collect();
                    if let Some(l) = lits {
                        found = Some(match found {
                            Some(f) => f.into_iter().filter(|a| l.contains(a)).collect(),
                            None => l,
                        });
                    }
                }
                Expr::In { lhs: Val::Fact(Fact::Recipient), set: SetRef::Strings(items) } => {
                    let l: Vec<String> = items.iter().map(|s| prog.str(*s).to_ascii_lowercase()).collect();
                    found = Some(match found {
                        Some(f) => f.into_iter().filter(|a| l.contains(a)).collect(),
                        None => l,
                    });
                }
                _ => {}
            }
        }
    }
    found.unwrap_or_else(|| vec![own.to_ascii_lowercase()])
}

pub fn lint(prog: &Program, sources: &SourceMap) -> Vec<Diagnostic> {
    let mut out = Vec::new();
    let code = prog.stage(Stage::Route);
    let route_paths = paths(code);
    // The listeners a stranger can send mail through (None: the default listener).
    let smtp: Vec<&crate::settings::Listener> =
        prog.listeners.iter().filter(|l| l.protocol != Protocol::Http).collect();
    let open_listeners: Vec<Option<&str>> = if smtp.is_empty() {
        vec![None]
    } else {
        smtp.iter()
            .filter(|l| l.auth() != Auth::Required && l.client_certs != ClientCerts::Require)
            .map(|l| Some(l.name.as_str()))
            .collect()
    };
    let mut seen: Vec<(u32, String)> = Vec::new();
    for (pc, instr) in code.iter().enumerate() {
        let Instr::Do { action: Action::ExpandList(i), loc } = instr else { continue };
        let Some(list) = prog.mailing_lists.get(*i as usize) else { continue };
        let own = list.source.clone().unwrap_or_default();
        for address in posting_addresses(prog, &route_paths[pc], &own) {
            if seen.contains(&(*i, address.clone())) {
                continue;
            }
            seen.push((*i, address.clone()));
            let (local, domain) = crate::address::split(&address);
            let open: Vec<&str> = open_listeners
                .iter()
                .filter(|l| {
                    let post = Post {
                        prog,
                        address: address.clone(),
                        local: local.to_string(),
                        domain: domain.to_ascii_lowercase(),
                        listener: **l,
                    };
                    !refused(&post)
                })
                .map(|l| l.unwrap_or("the default listener"))
                .collect();
            if open.is_empty() {
                continue;
            }
            let Some(span) = loc_span(prog, sources, *loc) else { continue };
            let on = if smtp.len() > 1 { format!(" through listener {}", open.join(", ")) } else { String::new() };
            out.push(
                Diagnostic::warning(
                    "mailc::open-list",
                    format!("anyone can post to the mailing list `{}` at <{address}>{on}", list.name),
                )
                .at(span)
                .label("sends a stranger's post to every subscriber")
                .help(format!(
                    "no rule refuses a client that is not authenticated, not in your networks and not one of your senders when it sends to <{address}>; restrict who posts in rcpt before any `accept`, e.g. `if recipient :is \"{address}\" and not (authenticated and auth.user in editors) {{ reject 550 5.7.1 \"Only the editors post to this list\"; }}`"
                )),
            );
        }
    }
    out
}
