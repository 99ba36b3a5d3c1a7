//! Warnings about rules: backscatter (R3, R27), dead conditions and shadowed rules (B3),
//! and the cost order of tests.

use crate::diag::Diagnostic;
use crate::ir::*;
use crate::source::SourceMap;
use std::collections::HashMap;

use super::{loc_span, source_line};

pub fn lint(prog: &Program, sources: &SourceMap) -> Vec<Diagnostic> {
    let mut out = Vec::new();
    for stage in Stage::ALL {
        let code = prog.stage(stage);
        dead(prog, sources, code, &mut out);
        shadowed_and_cost(prog, sources, stage, code, &mut out);
    }
    backscatter(prog, sources, &mut out);
    out
}

/// The `If` at `pc`: the end of its `then` block and of the whole `if/elsif/else`.
pub(super) fn extent(code: &[Instr], pc: usize) -> (usize, usize) {
    let Instr::If { else_pc, .. } = code[pc] else {
        return (pc + 1, pc + 1);
    };
    let else_pc = else_pc as usize;
    let end = match code.get(else_pc.wrapping_sub(1)) {
        Some(Instr::Jump(t)) if else_pc > pc + 1 => *t as usize,
        _ => else_pc,
    };
    (else_pc, end.max(else_pc))
}

/// Leaves a condition decides when it is true (`positive`) or false.
fn decided(prog: &Program, id: ExprId, positive: bool, out: &mut Vec<(Expr, bool)>) {
    match prog.expr(id) {
        Expr::Not(i) => decided(prog, *i, !positive, out),
        Expr::All(ids) if positive => ids.iter().for_each(|i| decided(prog, *i, true, out)),
        Expr::Any(ids) if !positive => ids.iter().for_each(|i| decided(prog, *i, false, out)),
        Expr::All(_) | Expr::Any(_) | Expr::Const(_) => {}
        leaf if stable(leaf) => out.push((leaf.clone(), positive)),
        _ => {}
    }
}

/// A leaf whose value cannot change within a stage (no variables).
fn stable(e: &Expr) -> bool {
    fn val(v: &Val) -> bool {
        match v {
            Val::Var(_) => false,
            Val::Lookup { key, .. } => val(key),
            Val::Rate { .. } | Val::Concurrent { .. } => false,
            _ => true,
        }
    }
    match e {
        Expr::Flag(_) | Expr::Greylist { .. } => false,
        Expr::CmpVal { lhs, rhs, .. } => val(lhs) && val(rhs),
        Expr::Match { lhs, rhs, .. } => val(lhs) && rhs.iter().all(|t| t.0.iter().all(|p| matches!(p, Part::Lit(_)))),
        Expr::Pattern { lhs, .. }
        | Expr::In { lhs, .. }
        | Expr::Cmp { lhs, .. }
        | Expr::IsNull(lhs)
        | Expr::Truth(lhs)
        | Expr::Fqdn(lhs)
        | Expr::Resolvable(lhs) => val(lhs),
        _ => true,
    }
}

/// Can this condition never be true, whatever the facts?
fn never(prog: &Program, id: ExprId) -> bool {
    match prog.expr(id) {
        Expr::Const(b) => !b,
        Expr::Truth(Val::Fact(Fact::False)) => true,
        Expr::Not(i) => always(prog, *i),
        Expr::Any(ids) => ids.iter().all(|i| never(prog, *i)),
        Expr::All(ids) => {
            if ids.iter().any(|i| never(prog, *i)) {
                return true;
            }
            let mut lits: Vec<(Expr, bool)> = Vec::new();
            decided(prog, id, true, &mut lits);
            for (i, (a, pa)) in lits.iter().enumerate() {
                for (b, pb) in &lits[i + 1..] {
                    if a == b && pa != pb {
                        return true;
                    }
                    if *pa && *pb && disjoint_is(prog, a, b) {
                        return true;
                    }
                }
            }
            false
        }
        _ => false,
    }
}

fn always(prog: &Program, id: ExprId) -> bool {
    match prog.expr(id) {
        Expr::Const(b) => *b,
        Expr::Truth(Val::Fact(Fact::True)) => true,
        Expr::Not(i) => never(prog, *i),
        Expr::All(ids) => ids.iter().all(|i| always(prog, *i)),
        Expr::Any(ids) => ids.iter().any(|i| always(prog, *i)),
        _ => false,
    }
}

/// `x :is "a"` and `x :is "b"` for a single-valued `x`: both cannot hold.
fn disjoint_is(prog: &Program, a: &Expr, b: &Expr) -> bool {
    let lits = |rhs: &[Template]| -> Option<Vec<String>> {
        rhs.iter()
            .map(|t| match t.0.as_slice() {
                [Part::Lit(s)] => Some(prog.str(*s).to_ascii_lowercase()),
                [] => Some(String::new()),
                _ => None,
            })
            .collect()
    };
    match (a, b) {
        (Expr::Match { lhs: la, op: MatchOp::Is, rhs: ra }, Expr::Match { lhs: lb, op: MatchOp::Is, rhs: rb })
            if la == lb && single_valued(la) =>
        {
            match (lits(ra), lits(rb)) {
                (Some(x), Some(y)) => !x.iter().any(|s| y.contains(s)),
                _ => false,
            }
        }
        _ => false,
    }
}

fn single_valued(v: &Val) -> bool {
    match v {
        Val::Fact(f) => f.info().ty == Ty::Str,
        Val::Lookup { .. } | Val::Lit(_) => true,
        _ => false,
    }
}

fn show(prog: &Program, sources: &SourceMap, loc: LocId) -> String {
    format!("{} `{}`", prog.describe_loc(loc), source_line(prog, sources, loc))
}

fn dead(prog: &Program, sources: &SourceMap, code: &[Instr], out: &mut Vec<Diagnostic>) {
    // Regions in which an enclosing condition decided some leaves: (start, end, leaves, loc).
    let mut regions: Vec<(usize, usize, Vec<(Expr, bool)>, LocId)> = Vec::new();
    for (pc, instr) in code.iter().enumerate() {
        let Instr::If { cond, else_pc, loc } = instr else {
            continue;
        };
        let Some(span) = loc_span(prog, sources, *loc) else {
            continue;
        };
        if never(prog, *cond) {
            out.push(
                Diagnostic::warning("mailc::dead", "this condition can never hold")
                    .at(span)
                    .label("always false")
                    .help("its tests contradict each other (or it is `not true`): the block never runs; fix the test or remove the rule"),
            );
        } else {
            let mut mine: Vec<(Expr, bool)> = Vec::new();
            decided(prog, *cond, true, &mut mine);
            let whole = match prog.expr(*cond) {
                Expr::Not(i) => Some((prog.expr(*i).clone(), false)),
                e if stable(e) && !matches!(e, Expr::All(_) | Expr::Any(_) | Expr::Const(_)) => Some((e.clone(), true)),
                _ => None,
            };
            if let Some((leaf, pol)) = whole {
                'outer: for (s, e, known, at) in &regions {
                    if pc > *s && pc < *e {
                        for (k, v) in known {
                            if *k == leaf {
                                let result = *v == pol;
                                out.push(
                                    Diagnostic::warning(
                                        "mailc::dead",
                                        format!("this condition is always {result} here"),
                                    )
                                    .at(span)
                                    .label(format!("always {result}"))
                                    .help(format!(
                                        "the enclosing condition at {} already decided this test; {}",
                                        show(prog, sources, *at),
                                        if result {
                                            "drop the test (its `else` never runs)"
                                        } else {
                                            "the block never runs: remove it"
                                        }
                                    )),
                                );
                                break 'outer;
                            }
                        }
                    }
                }
            }
        }
        let (else_at, end) = extent(code, pc);
        let mut yes = Vec::new();
        decided(prog, *cond, true, &mut yes);
        regions.push((pc, (*else_pc as usize).min(else_at), yes, *loc));
        let mut no = Vec::new();
        decided(prog, *cond, false, &mut no);
        if end > else_at {
            regions.push((else_at.saturating_sub(1), end, no, *loc));
        }
    }
}

/// How a straight `then` block ends the stage.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Ends {
    No,
    Refuses,
    Passes,
    Other,
}

/// Top-level `If`s of a stage (not nested in another), with how their `then` block ends
/// the stage when it is a straight line of actions.
fn top_level(code: &[Instr]) -> Vec<(usize, Ends)> {
    let mut out = Vec::new();
    let mut pc = 0;
    while pc < code.len() {
        match &code[pc] {
            Instr::If { else_pc, .. } => {
                let then_end = *else_pc as usize;
                let body = &code[pc + 1..then_end.min(code.len())];
                let body: Vec<&Instr> = body.iter().filter(|i| !matches!(i, Instr::Jump(_))).collect();
                let straight = !body.is_empty() && body.iter().all(|i| matches!(i, Instr::Do { .. }));
                let ends = match body.last() {
                    Some(Instr::Do { action, .. }) if straight && action.is_terminal() => match action {
                        Action::Reject(_) | Action::Tempfail(_) | Action::RejectCallahead => Ends::Refuses,
                        Action::Accept | Action::Stop => Ends::Passes,
                        _ => Ends::Other,
                    },
                    _ => Ends::No,
                };
                out.push((pc, ends));
                let (_, end) = extent(code, pc);
                // Walk the elsif arms: they are nested behind the first arm's jump.
                pc = end.max(pc + 1);
            }
            _ => pc += 1,
        }
    }
    out
}

fn conjuncts(prog: &Program, id: ExprId) -> Option<Vec<Expr>> {
    match prog.expr(id) {
        Expr::All(ids) => {
            let mut v = Vec::new();
            for i in ids {
                v.extend(conjuncts(prog, *i)?);
            }
            Some(v)
        }
        e if stable(e) && !matches!(e, Expr::Any(_) | Expr::Const(_)) => Some(vec![e.clone()]),
        _ => None,
    }
}

fn network(prog: &Program, id: ExprId) -> bool {
    fn val(prog: &Program, v: &Val) -> bool {
        match v {
            Val::Lookup { table, key } => remote(prog, *table) || val(prog, key),
            Val::Fact(Fact::Spf | Fact::Dkim | Fact::Dmarc | Fact::DmarcPolicy) => true,
            _ => false,
        }
    }
    match prog.expr(id) {
        Expr::Not(i) => network(prog, *i),
        Expr::All(ids) | Expr::Any(ids) => ids.iter().any(|i| network(prog, *i)),
        Expr::Dnsbl { .. } | Expr::Rhsbl { .. } | Expr::Resolvable(_) | Expr::Callahead => true,
        Expr::In { lhs, set } => val(prog, lhs) || matches!(set, SetRef::Table(t) if remote(prog, *t)),
        Expr::CmpVal { lhs, rhs, .. } => val(prog, lhs) || val(prog, rhs),
        Expr::Match { lhs, .. }
        | Expr::Pattern { lhs, .. }
        | Expr::Cmp { lhs, .. }
        | Expr::IsNull(lhs)
        | Expr::Truth(lhs) => val(prog, lhs),
        _ => false,
    }
}

fn lookup_free(prog: &Program, id: ExprId) -> bool {
    match prog.expr(id) {
        Expr::Not(i) => lookup_free(prog, *i),
        Expr::All(ids) | Expr::Any(ids) => ids.iter().all(|i| lookup_free(prog, *i)),
        Expr::In { lhs, set } => !matches!(set, SetRef::Table(_)) && !matches!(lhs, Val::Lookup { .. }),
        Expr::CmpVal { .. } => false,
        Expr::Match { lhs, .. }
        | Expr::Pattern { lhs, .. }
        | Expr::Cmp { lhs, .. }
        | Expr::IsNull(lhs)
        | Expr::Truth(lhs) => !matches!(
            lhs,
            Val::Lookup { .. }
                | Val::Rate { .. }
                | Val::Concurrent { .. }
                | Val::Score(_)
                | Val::Fact(Fact::Spf | Fact::Dkim | Fact::Dmarc | Fact::DmarcPolicy)
        ),
        Expr::Const(_) | Expr::Flag(_) | Expr::Fqdn(_) => true,
        _ => false,
    }
}

fn remote(prog: &Program, t: TableId) -> bool {
    prog.tables.get(t.index()).is_some_and(|r| matches!(r.kind.as_str(), "ldap" | "sql"))
}

fn shadowed_and_cost(prog: &Program, sources: &SourceMap, stage: Stage, code: &[Instr], out: &mut Vec<Diagnostic>) {
    struct Top {
        cond: ExprId,
        loc: LocId,
        ends: Ends,
        conj: Option<Vec<Expr>>,
    }
    let tops: Vec<Top> = top_level(code)
        .into_iter()
        .filter_map(|(pc, ends)| match &code[pc] {
            Instr::If { cond, loc, .. } => Some(Top { cond: *cond, loc: *loc, ends, conj: conjuncts(prog, *cond) }),
            _ => None,
        })
        .collect();
    // Shadowed: B's condition implies A's (A's conjuncts are among B's), and A always ends
    // the stage. Earlier terminal rules are indexed by their first conjunct, so a rule is
    // only compared with the rules that could shadow it (linear in practice).
    let key = |e: &Expr| format!("{e:?}");
    let mut by_first: HashMap<String, Vec<usize>> = HashMap::new();
    for (bi, b) in tops.iter().enumerate() {
        if let Some(bc) = &b.conj {
            let mut shadow = None;
            'find: for x in bc {
                for &ai in by_first.get(&key(x)).map(Vec::as_slice).unwrap_or(&[]) {
                    if tops[ai].conj.as_ref().is_some_and(|ac| ac.iter().all(|y| bc.contains(y))) {
                        shadow = Some(ai);
                        break 'find;
                    }
                }
            }
            if let Some(ai) = shadow {
                if let Some(span) = loc_span(prog, sources, b.loc) {
                    out.push(
                        Diagnostic::warning("mailc::shadowed", "this rule never runs")
                            .at(span)
                            .label("shadowed")
                            .help(format!(
                                "whenever its condition holds, the earlier rule at {} holds too and ends the `{}` stage; move this rule before it, or remove it",
                                show(prog, sources, tops[ai].loc),
                                stage.name()
                            )),
                    );
                }
            }
        }
        if b.ends != Ends::No {
            if let Some(first) = b.conj.as_ref().and_then(|c| c.first()) {
                by_first.entry(key(first)).or_default().push(bi);
            }
        }
    }
    // Cost: A refuses after asking the network; a later B, a local test, lets the client
    // through: every client B passes pays for A's lookup first. One backward scan finds,
    // for each rule, the first later local rule that passes.
    let mut next_local_pass: Option<usize> = None;
    let mut hint_for = vec![None; tops.len()];
    for (i, t) in tops.iter().enumerate().rev() {
        hint_for[i] = next_local_pass;
        if t.ends == Ends::Passes && lookup_free(prog, t.cond) && !network(prog, t.cond) {
            next_local_pass = Some(i);
        }
    }
    for (i, a) in tops.iter().enumerate() {
        let Some(bi) = hint_for[i] else { continue };
        if a.ends == Ends::Refuses && network(prog, a.cond) {
            if let Some(span) = loc_span(prog, sources, a.loc) {
                out.push(
                    Diagnostic::warning(
                        "mailc::cost",
                        "a network lookup runs before a cheap local test that also decides this stage",
                    )
                    .at(span)
                    .label("network lookup")
                    .help(format!(
                        "move the local test at {} before this one: every client it decides would be spared the lookup",
                        show(prog, sources, tops[bi].loc)
                    )),
                );
            }
        }
    }
}

// ---- backscatter ----------------------------------------------------------------------

fn internal_host(prog: &Program, dest: &str) -> bool {
    let d = dest.trim();
    if d.starts_with("unix:") {
        return true;
    }
    let host = match d.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => d.rsplit_once(':').map(|(h, _)| h).unwrap_or(d),
    };
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return match ip {
            std::net::IpAddr::V4(v4) => v4.is_private() || v4.is_loopback(),
            std::net::IpAddr::V6(v6) => v6.is_loopback() || (v6.segments()[0] & 0xfe00) == 0xfc00,
        };
    }
    let locals = match prog.server.local_domains {
        Some(id) => prog.lists.get(id.index()).map(|l| l.items.clone()).unwrap_or_default(),
        None => vec![],
    };
    locals.iter().any(|p| {
        crate::address::domain_matches(p, host)
            || crate::address::domain_matches(&format!(".{}", p.trim_start_matches('.')), host)
    })
}

/// Does the condition validate the recipient (a table, directory or call-ahead about it)?
fn validates(prog: &Program, id: ExprId) -> bool {
    fn rcpt(v: &Val) -> bool {
        matches!(v, Val::Fact(Fact::Recipient | Fact::RecipientLocal | Fact::RecipientDetail))
    }
    match prog.expr(id) {
        Expr::Not(i) => validates(prog, *i),
        Expr::All(ids) | Expr::Any(ids) => ids.iter().any(|i| validates(prog, *i)),
        Expr::Callahead | Expr::BatvValid => true,
        Expr::In { lhs, set } => rcpt(lhs) && matches!(set, SetRef::Table(_) | SetRef::List(_) | SetRef::Strings(_)),
        Expr::Match { lhs: Val::Lookup { key, .. }, .. } | Expr::IsNull(Val::Lookup { key, .. }) => rcpt(key),
        _ => false,
    }
}

fn backscatter(prog: &Program, sources: &SourceMap, out: &mut Vec<Diagnostic>) {
    // The internal hosts the route stage relays to.
    let mut target: Option<(LocId, String)> = None;
    for instr in prog.stage(Stage::Route) {
        if let Instr::Do { action: Action::Deliver(t), loc } = instr {
            if !matches!(t.kind, TransportKind::Smtp | TransportKind::Lmtp) {
                continue;
            }
            let Some(dest) = &t.dest else { continue };
            let fixed: Option<String> = dest
                .0
                .iter()
                .map(|p| match p {
                    Part::Lit(s) => Some(prog.str(*s).to_string()),
                    Part::Val(_) => None,
                })
                .collect();
            if let Some(d) = fixed {
                if internal_host(prog, &d) {
                    target = Some((*loc, d));
                    break;
                }
            }
        }
    }
    let Some((loc, host)) = target else { return };
    // Is there a way through rcpt that accepts, for an outside client, without validating
    // and without NOTIFY=NEVER?
    let ip = super::relay::attacker_ip(prog);
    let code = prog.stage(Stage::Rcpt);
    let mut work = vec![(0usize, false, false)];
    let mut budget = 4096;
    let mut hole = false;
    while let Some((mut pc, mut valid, mut never)) = work.pop() {
        if budget == 0 || hole {
            break;
        }
        budget -= 1;
        loop {
            match code.get(pc) {
                None => {
                    hole |= !valid && !never;
                    break;
                }
                Some(Instr::Jump(t)) => pc = *t as usize,
                Some(Instr::If { cond, else_pc, .. }) => {
                    let v = valid || validates(prog, *cond);
                    let known = outside(prog, *cond, ip);
                    if !always(prog, *cond) && known != Some(true) {
                        work.push((*else_pc as usize, v, never));
                    }
                    if never_holds(prog, *cond) || known == Some(false) {
                        pc = *else_pc as usize;
                    } else {
                        pc += 1;
                    }
                    valid = v;
                }
                Some(Instr::Do { action, .. }) => match action {
                    Action::Dsn(DsnAction::NotifyNever) => {
                        never = true;
                        pc += 1;
                    }
                    Action::Accept | Action::Stop => {
                        hole |= !valid && !never;
                        break;
                    }
                    Action::Reject(_) | Action::Tempfail(_) | Action::RejectCallahead | Action::Discard => break,
                    Action::Access(..) => {
                        pc += 1;
                    }
                    _ => pc += 1,
                },
            }
        }
    }
    if !hole {
        return;
    }
    let Some(span) = loc_span(prog, sources, loc) else {
        return;
    };
    out.push(
        Diagnostic::warning(
            "mailc::backscatter",
            format!("recipients are relayed to the internal host {host} without being validated at RCPT, and their DSNs are not suppressed"),
        )
        .at(span)
        .label("relays unvalidated recipients")
        .help("the back end will bounce unknown users to forged senders (backscatter). Pick one of R3's remedies: (a) the final server accepts unknown users and discards them (`discard;` / `redirect` to a sink); (b) set `dsn notify never;` at rcpt for outside clients on this gateway; (c) drop DSNs leaving the organisation at the outbound gateway (`on bounce { discard; }`, and null-sender mail to outside domains at rcpt); (d) validate recipients at RCPT against the back end's directory (`recipient not in directory` with an ldap table, or `callahead`)"),
    );
}

/// The value of a condition for an outside client (not authenticated, its address outside
/// the narrow networks, no flag that only trusted tests set), when that decides it.
fn outside(prog: &Program, id: ExprId, ip: std::net::IpAddr) -> Option<bool> {
    outside_at(prog, id, ip, 0)
}

fn outside_at(prog: &Program, id: ExprId, ip: std::net::IpAddr, depth: u8) -> Option<bool> {
    let outside = |p: &Program, i: ExprId, ip| outside_at(p, i, ip, depth);
    match prog.expr(id) {
        Expr::Const(b) => Some(*b),
        Expr::Not(i) => outside(prog, *i, ip).map(|b| !b),
        Expr::All(ids) => {
            let mut all = Some(true);
            for i in ids {
                match outside(prog, *i, ip) {
                    Some(false) => return Some(false),
                    Some(true) => {}
                    None => all = None,
                }
            }
            all
        }
        Expr::Any(ids) => {
            let mut any = Some(false);
            for i in ids {
                match outside(prog, *i, ip) {
                    Some(true) => return Some(true),
                    Some(false) => {}
                    None => any = None,
                }
            }
            any
        }
        Expr::Truth(Val::Fact(Fact::Authenticated)) => Some(false),
        Expr::In { lhs: Val::Fact(Fact::ClientIp), set: SetRef::List(l) } => {
            prog.lists.get(l.index()).map(|l| l.nets.iter().any(|n| n.contains(ip)))
        }
        Expr::In { lhs: Val::Fact(Fact::ClientIp), set: SetRef::Nets(n) } => Some(n.iter().any(|n| n.contains(ip))),
        Expr::Flag(v) if depth < 4 && trusted_flag(prog, *v, ip, depth + 1) => Some(false),
        _ => None,
    }
}

/// Is every `set` of this flag under a condition false for an outside client?
fn trusted_flag(prog: &Program, var: VarId, ip: std::net::IpAddr, depth: u8) -> bool {
    let mut any = false;
    for stage in Stage::ALL {
        let code = prog.stage(stage);
        for (pc, instr) in code.iter().enumerate() {
            let Instr::Do { action: Action::Set { var: v, .. } | Action::Unset(v), .. } = instr else {
                continue;
            };
            if *v != var || !matches!(instr, Instr::Do { action: Action::Set { .. }, .. }) {
                continue;
            }
            any = true;
            // The innermost If whose then-block holds this set must be false outside.
            let guarded = code.iter().enumerate().any(|(q, i)| match i {
                Instr::If { cond, else_pc, .. } => {
                    q < pc && pc < *else_pc as usize && outside_at(prog, *cond, ip, depth) == Some(false)
                }
                _ => false,
            });
            if !guarded {
                return false;
            }
        }
    }
    any
}

fn never_holds(prog: &Program, id: ExprId) -> bool {
    never(prog, id)
}
