//! A whole session, and what happens to the message after it.
//!
//! The proof follows one **final path** through a session: the connect stage, then the
//! HELO, MAIL and RCPT whose values the relayed message carries, the DATA stage, and the
//! queue side (route) for every address the message goes to. Everything else the client
//! may send in between (other HELOs, failed AUTHs, other transactions, earlier RCPTs of
//! this one) is a **gap**: it can only change variables, and it can change them only to
//! values the stage programs can write. Those values are computed first, as a fixpoint
//! over every stage run from any reachable state (*gap shapes*); on the final path a
//! variable read after a gap is either what the path gave it or any gap shape, each with
//! the condition under which a command writes it. This over-approximates every session,
//! however many commands it has.

use std::collections::HashMap;

use super::explore::{End, Env, GapUse, MailEnv, Path, RcptEnv, Shape, Trace};
use super::sym::{AtomKind, Conj, LangSpec, Lit, Origin, SymId, SymKind, View};
use super::term::{Part, Term, B};
use super::{auto, Prover};
use crate::ir::*;

/// Runs of the final path.
pub const RUN_CONNECT: u32 = 1;
pub const RUN_HELO: u32 = 2;
pub const RUN_MAIL: u32 = 3;
pub const RUN_RCPT: u32 = 4;
pub const RUN_DATA: u32 = 5;
pub const RUN_ROUTE: u32 = 10;
/// Runs that stand for any command of a gap: `RUN_GAP + stage`.
pub const RUN_GAP: u32 = 1000;

/// Stages whose runs a gap may contain (bit masks of `Stage::bit`).
pub const GAP_BEFORE_HELO: u16 = 0b11_1110; // helo auth mail rcpt data
pub const GAP_AFTER_HELO: u16 = 0b11_1100; // auth mail rcpt data
pub const GAP_RCPT: u16 = 0b01_0000; // rcpt

/// A value some command not on the final path can give a variable.
#[derive(Clone, Debug)]
pub struct GapShape {
    pub var: u32,
    pub stage: Stage,
    pub value: Shape,
    /// Symbols of the writing run that the value or condition mention (copied per use).
    pub placeholders: Vec<SymId>,
    /// Each way the value is written: the condition over placeholders and session symbols.
    pub ways: Vec<Conj>,
    /// The condition is no longer tracked (the fixpoint widened it).
    pub top: bool,
    /// The writing run's end, for the counterexample.
    pub accepted: bool,
}

/// A message leaving for an address the attacker chose.
#[derive(Clone, Debug)]
pub struct RelayEnd {
    pub path: Path,
    pub target: Term,
    /// How the address got there: "the recipient", "bcc", "redirect" ...
    pub via: String,
    /// Why the recipient was accepted (for RCPT relays).
    pub why: String,
    pub decided_by: Option<LocId>,
    /// The transport that takes it (mx, smtp).
    pub transport: String,
    /// The session's decisions, then the route stage's.
    pub session_trace: Vec<(LocId, String)>,
    pub route_trace: Vec<(LocId, String)>,
    /// Which RCPT outcome: 250 by `accept`, by the built-in rule, by access RELAY.
    pub rcpt_end: Option<End>,
}

const MAX_ITER: usize = 4;
const ROUTE_DEPTH: usize = 3;

impl Prover<'_> {
    // ---- gaps -----------------------------------------------------------------------------

    fn session_syms(&self) -> Vec<SymId> {
        let s = &self.session;
        vec![s.client_ip, s.client_port, s.client_name, s.client_ptr, s.local_ip, s.session_id]
    }

    /// The facts of a run of `stage` that stands for a command in a gap.
    fn gap_env(&mut self, stage: Stage) -> Env {
        let run = RUN_GAP + stage as u32;
        self.env_for(stage, run)
    }

    /// A run's environment: its own symbols for everything the command carries.
    pub fn env_for(&mut self, stage: Stage, run: u32) -> Env {
        let mut env = Env { stage: Some(stage), run, ..Env::default() };
        if stage >= Stage::Helo {
            let helo_run = if run < RUN_GAP && stage > Stage::Helo { RUN_HELO } else { run };
            let h = self.str_sym(Origin::Fact { run: helo_run, fact: "helo.name" }, Some(self.helo_lang.clone()), true);
            let e = self.w.sym(Origin::Fact { run: helo_run, fact: "helo.extended" }, SymKind::Bool, true);
            let eb = B::atom(self.w.atom(e, AtomKind::True));
            env.helo = Some((Term::sym(h, View::Whole), eb));
        }
        if stage == Stage::Auth {
            let base = LangSpec::bytes(
                auto::exact(&self.listener.mechanisms.iter().map(String::as_str).collect::<Vec<_>>()),
                View::Whole,
            );
            env.auth_mech = Some(self.str_sym(Origin::Fact { run, fact: "auth.mechanism" }, Some(base), true));
        }
        if stage >= Stage::Mail {
            let mail_run = if run < RUN_GAP && stage > Stage::Mail { RUN_MAIL } else { run };
            let s = self.str_sym(Origin::Fact { run: mail_run, fact: "sender" }, Some(self.sender_lang.clone()), true);
            env.sender = Some(s);
            let max = self.max_message_size;
            let size = self.w.sym(
                Origin::Fact { run: mail_run, fact: "mail.size" },
                SymKind::Num(super::sets::NumSet::range(0, max)),
                true,
            );
            let body_base = LangSpec::exact(&["7BIT", "8BITMIME", "BINARYMIME"]);
            let body = self.str_sym(Origin::Fact { run: mail_run, fact: "mail.body" }, Some(body_base), true);
            let utf8 = self.w.sym(Origin::Fact { run: mail_run, fact: "mail.smtputf8" }, SymKind::Bool, true);
            let ret_base = LangSpec::exact(&["", "FULL", "HDRS"]);
            let ret = self.str_sym(Origin::Fact { run: mail_run, fact: "dsn.ret" }, Some(ret_base), true);
            let envid =
                self.str_sym(Origin::Fact { run: mail_run, fact: "dsn.envid" }, Some(self.xtext_lang.clone()), true);
            env.mail = Some(MailEnv { size, body, utf8, ret, envid });
        }
        if stage == Stage::Rcpt {
            let r = self.str_sym(Origin::Fact { run, fact: "recipient" }, Some(self.rcpt_lang.clone()), true);
            let route = self.w.sym(Origin::Fact { run, fact: "source-route" }, SymKind::Bool, true);
            let nbase = LangSpec::exact(&["NEVER", "SUCCESS", "FAILURE", "DELAY"]);
            let notify = self.w.sym(Origin::Fact { run, fact: "dsn.notify" }, SymKind::List(Some(nbase)), true);
            let orcpt = self.str_sym(Origin::Fact { run, fact: "dsn.orcpt" }, Some(self.xtext_lang.clone()), true);
            env.rcpt = Some(RcptEnv { addr: Term::sym(r, View::Whole), route: Some(route), notify, orcpt });
        }
        if stage == Stage::Data {
            let others =
                self.w.sym(Origin::Fact { run, fact: "recipients" }, SymKind::List(Some(self.rcpt_lang.clone())), true);
            env.recipients = Some((None, others));
            env.message = true;
        }
        env
    }

    /// The values every variable can get from commands in gaps, as a fixpoint.
    pub fn compute_gaps(&mut self) {
        let nvars = self.prog.vars.len();
        let mut stages = vec![Stage::Connect, Stage::Helo];
        if self.listener.auth_offered {
            stages.push(Stage::Auth);
        }
        stages.extend([Stage::Mail, Stage::Rcpt, Stage::Data]);
        // Only a stage that sets or unsets a variable can write one.
        stages.retain(|st| {
            self.prog.stage(*st).iter().any(|i| {
                matches!(i, Instr::Do { action: Action::Set { .. } | Action::Unset(_) | Action::Access(..), .. })
            })
        });
        let mut widened_vars = vec![false; nvars];
        for iter in 0..(MAX_ITER + nvars + 2) {
            // One more slot: the session's relay permission from an access table.
            let mut changed = vec![false; nvars + 1];
            for &st in &stages {
                let env = if st == Stage::Connect { self.env_for(st, RUN_GAP) } else { self.gap_env(st) };
                let mask: u16 = 0b11_1111;
                let start = Path {
                    cons: self.root.clone(),
                    vars: (0..nvars).map(|_| Shape::Open(Box::new(Shape::Unset), mask)).collect(),
                    grant: false,
                    tls: false,
                    held: false,
                    effects: Vec::new(),
                    trace: Trace::default(),
                    gaps: Vec::new(),
                };
                let mut starts = self.tls_choices(start, true);
                if st == Stage::Auth && self.listener.auth_needs_tls {
                    starts.retain(|p| p.tls);
                }
                let ends = self.run_open(st, &env, starts);
                for (q, end, _) in ends {
                    let accepted = !matches!(end, End::Refuse);
                    if q.grant && matches!(st, Stage::Helo | Stage::Auth) {
                        changed[nvars] |=
                            self.add_gap_shape(nvars as u32, st, Shape::Set(Term::lit("1")), &q, &env, accepted);
                    }
                    for v in 0..nvars {
                        let val = q.vars[v].clone();
                        if matches!(val, Shape::Open(..)) {
                            continue;
                        }
                        // Only a read: the value came from the entry state.
                        if let Some(u) = q.gaps.iter().rev().find(|g| g.var == v as u32) {
                            if u.value == val {
                                continue;
                            }
                        }
                        if widened_vars[v] {
                            continue;
                        }
                        if self.add_gap_shape(v as u32, st, val, &q, &env, accepted) {
                            changed[v] = true;
                        }
                    }
                }
            }
            if !changed.iter().any(|c| *c) {
                return;
            }
            if iter + 1 >= MAX_ITER {
                // Still changing: any value, maybe set, for those variables.
                for v in 0..nvars {
                    if changed[v] && !widened_vars[v] {
                        widened_vars[v] = true;
                        self.widen_var(v as u32);
                    }
                }
                for g in self.gap_shapes.iter_mut() {
                    if changed.get(g.var as usize).copied().unwrap_or(false) {
                        g.top = true;
                    }
                }
            }
        }
        for v in 0..nvars {
            if !widened_vars[v] {
                self.widen_var(v as u32);
            }
        }
    }

    fn widen_var(&mut self, v: u32) {
        let val = self.str_sym(Origin::World { what: format!("gap-any:{v}"), run: 0 }, None, true);
        let set = self.w.sym(Origin::World { what: format!("gap-any-set:{v}"), run: 0 }, SymKind::Bool, true);
        for st in [Stage::Helo, Stage::Mail, Stage::Rcpt] {
            self.gap_shapes.push(GapShape {
                var: v,
                stage: st,
                value: Shape::Any(val, set),
                placeholders: vec![val, set],
                ways: vec![Conj::top()],
                top: true,
                accepted: true,
            });
        }
    }

    /// Record a value a gap run writes; true when it is new (or newly possible).
    fn add_gap_shape(&mut self, var: u32, stage: Stage, value: Shape, q: &Path, env: &Env, accepted: bool) -> bool {
        let session = self.session_syms();
        let mut keep: Vec<SymId> = Vec::new();
        let add = |s: SymId, keep: &mut Vec<SymId>| {
            if !keep.contains(&s) {
                keep.push(s);
            }
        };
        match &value {
            Shape::Set(t) => {
                for (s, _) in t.syms() {
                    add(s, &mut keep);
                }
            }
            Shape::Any(a, b) => {
                add(*a, &mut keep);
                add(*b, &mut keep);
            }
            _ => {}
        }
        for s in env_syms(env) {
            add(s, &mut keep);
        }
        let placeholders: Vec<SymId> = keep.iter().copied().filter(|s| !session.contains(s)).collect();
        let mut all = keep.clone();
        all.extend(session.iter().copied());
        let cons = self.project(&q.cons, &all);
        if let Some(g) = self.gap_shapes.iter_mut().find(|g| g.var == var && g.stage == stage && g.value == value) {
            if g.top || g.ways.iter().any(|w| conj_eq(w, &cons)) {
                return false;
            }
            if g.ways.len() >= 8 {
                g.top = true;
                g.ways = vec![Conj::top()];
                return true;
            }
            g.ways.push(cons);
            g.accepted |= accepted;
            return true;
        }
        self.gap_shapes.push(GapShape { var, stage, value, placeholders, ways: vec![cons], top: false, accepted });
        true
    }

    /// The part of a constraint about these symbols (dropping the rest weakens it: sound).
    pub fn project(&self, c: &Conj, keep: &[SymId]) -> Conj {
        let mut lits: Vec<Lit> = Vec::new();
        for l in c.iter() {
            if let Some(x) = self.project_lit(l, keep) {
                lits.push(x);
            }
        }
        lits.into_iter().rev().fold(Conj::top(), |c, l| c.with(l))
    }

    fn project_lit(&self, l: &Lit, keep: &[SymId]) -> Option<Lit> {
        match l {
            Lit::Atom(a, _) => keep.contains(&self.w.atom_sym(*a)).then(|| l.clone()),
            Lit::Or(branches) => {
                let mut out = Vec::new();
                for b in branches {
                    let p = self.project(b, keep);
                    if p.is_empty() {
                        return None;
                    }
                    out.push(p);
                }
                Some(Lit::Or(out))
            }
        }
    }

    /// A constraint with symbols renamed.
    pub fn rename(&mut self, c: &Conj, map: &HashMap<SymId, SymId>) -> Conj {
        let lits: Vec<Lit> = c.iter().cloned().collect();
        let mut out = Conj::top();
        for l in lits.into_iter().rev() {
            let x = self.rename_lit(&l, map);
            out = out.with(x);
        }
        out
    }

    fn rename_lit(&mut self, l: &Lit, map: &HashMap<SymId, SymId>) -> Lit {
        match l {
            Lit::Atom(a, p) => {
                let (s, kind) = self.w.atoms[*a as usize].clone();
                match map.get(&s) {
                    Some(t) => Lit::Atom(self.w.atom(*t, kind), *p),
                    None => l.clone(),
                }
            }
            Lit::Or(bs) => {
                let bs = bs.clone();
                Lit::Or(bs.iter().map(|b| self.rename(b, map)).collect())
            }
        }
    }

    /// The gap shapes of `var` that runs of the stages in `mask` write (an AUTH that needs
    /// TLS only on a path that has it: STARTTLS is never undone).
    fn gap_candidates(&self, var: u32, mask: u16, tls: bool) -> Vec<usize> {
        let auth_ok = tls || !self.listener.auth_needs_tls;
        self.gap_shapes
            .iter()
            .enumerate()
            .filter(|(_, g)| g.var == var && mask & g.stage.bit() != 0 && (g.stage != Stage::Auth || auth_ok))
            .map(|(i, _)| i)
            .collect()
    }

    /// A gap shape's value for one use: its symbols copied, its condition renamed.
    fn instantiate(&mut self, shape: usize, run: u32) -> (Shape, Conj, Vec<(SymId, SymId)>) {
        let g = self.gap_shapes[shape].clone();
        let mut map = HashMap::new();
        let mut copies = Vec::new();
        for ph in &g.placeholders {
            let kind = self.w.syms[*ph as usize].kind.clone();
            let attacker = self.w.syms[*ph as usize].attacker;
            let c = self.w.sym(Origin::Copy { of: *ph, serial: run * 4096 + g.var }, kind, attacker);
            map.insert(*ph, c);
            copies.push((*ph, c));
        }
        let value = match &g.value {
            Shape::Set(t) => Shape::Set(Term(
                t.0.iter()
                    .map(|p| match p {
                        Part::Sym(s, v) => Part::Sym(*map.get(s).unwrap_or(s), *v),
                        l => l.clone(),
                    })
                    .collect(),
            )),
            Shape::Any(a, b) => Shape::Any(*map.get(a).unwrap_or(a), *map.get(b).unwrap_or(b)),
            other => other.clone(),
        };
        let cons = if g.top {
            Conj::top()
        } else {
            let ways = g.ways.clone();
            let renamed: Vec<Conj> = ways.iter().map(|w| self.rename(w, &map)).collect();
            if renamed.len() == 1 {
                renamed.into_iter().next().unwrap_or_default()
            } else {
                Conj::top().with(Lit::Or(renamed))
            }
        };
        (value, cons, copies)
    }

    /// Resolve the open variables a step reads into each possible value.
    fn resolve(&mut self, p: Path, reads: &[u32], run: u32) -> Vec<Path> {
        let mut paths = vec![p];
        for &v in reads {
            let mut next = Vec::new();
            for p in paths {
                let Some(Shape::Open(cur, mask)) = p.vars.get(v as usize).cloned() else {
                    next.push(p);
                    continue;
                };
                let mut keep = p.clone();
                keep.vars[v as usize] = (*cur).clone();
                keep.gaps.push(GapUse { var: v, shape: None, copies: Vec::new(), value: (*cur).clone() });
                next.push(keep);
                for s in self.gap_candidates(v, mask, p.tls) {
                    let (val, cons, copies) = self.instantiate(s, run);
                    let mut q = p.clone();
                    q.vars[v as usize] = val.clone();
                    q.cons = conj_and(&q.cons, &cons);
                    q.gaps.push(GapUse { var: v, shape: Some(s), copies, value: val });
                    next.push(q);
                }
            }
            paths = next;
        }
        paths
    }

    /// Run a stage, resolving open variables before each step that reads them.
    pub fn run_open(&mut self, stage: Stage, env: &Env, start: Vec<Path>) -> super::explore::Ends {
        let reads = self.stage_reads(stage);
        let mut starts = Vec::new();
        for p in start {
            let open: Vec<u32> =
                reads.iter().copied().filter(|v| matches!(p.vars.get(*v as usize), Some(Shape::Open(..)))).collect();
            starts.extend(self.resolve(p, &open, env.run));
        }
        self.run(stage, env, starts)
    }

    /// Every variable a stage's program reads (resolved when the run starts: the same
    /// value for every read of the run, as a run reads a variable's one value).
    fn stage_reads(&self, stage: Stage) -> Vec<u32> {
        let mut out: Vec<u32> = Vec::new();
        let val = |v: &Val, out: &mut Vec<u32>| walk_val(v, out);
        for i in self.prog.stage(stage) {
            match i {
                Instr::If { cond, .. } => expr_vars(self.prog, *cond, &mut out),
                Instr::Do { action, .. } => {
                    for t in action_templates(action) {
                        for p in &t.0 {
                            if let crate::ir::Part::Val(v) = p {
                                val(v, &mut out);
                            }
                        }
                    }
                }
                Instr::Jump(_) => {}
            }
        }
        out.sort();
        out.dedup();
        out
    }

    /// Both TLS states where the listener lets the client choose.
    pub fn tls_choices(&self, p: Path, free: bool) -> Vec<Path> {
        use super::TlsOpt::*;
        match self.listener.tls {
            Off => vec![Path { tls: false, ..p }],
            Implicit | Required if !free => vec![Path { tls: true, ..p }],
            Implicit => vec![Path { tls: true, ..p }],
            Required | Starttls => vec![Path { tls: false, ..p.clone() }, Path { tls: true, ..p }],
        }
    }

    /// A HELO or failed AUTH off the path whose `access` table says RELAY gives the whole
    /// session the relay permission: each path may have it afterwards.
    fn grant_gaps(&mut self, paths: Vec<Path>, mask: u16) -> Vec<Path> {
        let pseudo = self.prog.vars.len() as u32;
        let mut out = Vec::new();
        for p in paths {
            if !p.grant {
                for s in self.gap_candidates(pseudo, mask, p.tls) {
                    let (val, cons, copies) = self.instantiate(s, super::session::RUN_GAP - 1);
                    let mut q = p.clone();
                    q.grant = true;
                    q.cons = conj_and(&q.cons, &cons);
                    q.gaps.push(GapUse { var: pseudo, shape: Some(s), copies, value: val });
                    out.push(q);
                }
            }
            out.push(p);
        }
        out
    }

    fn open_all(&self, p: &mut Path, mask: u16, only_session: bool) {
        for (i, v) in p.vars.iter_mut().enumerate() {
            if only_session && self.prog.vars.get(i).is_some_and(|x| x.scope != Scope::Session) {
                continue;
            }
            let cur = std::mem::replace(v, Shape::Unset);
            *v = match cur {
                Shape::Open(inner, m) => Shape::Open(inner, m | mask),
                other => Shape::Open(Box::new(other), mask),
            };
        }
    }

    fn clear_tx(&self, p: &mut Path) {
        for (i, v) in p.vars.iter_mut().enumerate() {
            if self.prog.vars.get(i).is_some_and(|x| x.scope == Scope::Transaction) {
                *v = Shape::Unset;
            }
        }
    }

    // ---- the final path -------------------------------------------------------------------

    /// Every way a message can leave for an address the attacker chose.
    pub fn final_paths(&mut self) -> Vec<RelayEnd> {
        let nvars = self.prog.vars.len();
        let p0 = Path {
            cons: self.root.clone(),
            vars: vec![Shape::Unset; nvars],
            grant: false,
            tls: self.listener.tls == super::TlsOpt::Implicit,
            held: false,
            effects: Vec::new(),
            trace: Trace::default(),
            gaps: Vec::new(),
        };
        let warn = self.warn_only;
        let accepted = |e: &End| match e {
            End::Accept | End::Default | End::AcceptRelay { .. } | End::Deliver(..) => true,
            End::Refuse => warn,
            End::Discard => false,
        };
        // connect
        let env = self.env_for(Stage::Connect, RUN_CONNECT);
        let ends = self.run_open(Stage::Connect, &env, vec![p0]);
        let paths: Vec<Path> = ends.into_iter().filter(|(_, e, _)| accepted(e)).map(|(p, _, _)| p).collect();
        // STARTTLS (before the final HELO), and the gap before it.
        let mut next = Vec::new();
        let mut paths = self.grant_gaps(paths, GAP_BEFORE_HELO);
        for mut p in paths {
            self.open_all(&mut p, GAP_BEFORE_HELO, false);
            if self.listener.tls == super::TlsOpt::Implicit {
                next.push(p);
            } else {
                next.extend(self.tls_choices(p, true));
            }
        }
        paths = next;
        if self.listener.tls == super::TlsOpt::Required {
            paths.retain(|p| p.tls);
        }
        // helo
        let env = self.env_for(Stage::Helo, RUN_HELO);
        let ends = self.run_open(Stage::Helo, &env, paths);
        paths = ends.into_iter().filter(|(_, e, _)| accepted(e)).map(|(p, _, _)| p).collect();
        paths = self.grant_gaps(paths, GAP_AFTER_HELO);
        for p in &mut paths {
            self.open_all(p, GAP_AFTER_HELO, false);
        }
        // mail
        let env = self.env_for(Stage::Mail, RUN_MAIL);
        for p in &mut paths {
            self.clear_tx(p);
        }
        let ends = self.run_open(Stage::Mail, &env, paths);
        paths = ends.into_iter().filter(|(_, e, _)| accepted(e)).map(|(p, _, _)| p).collect();
        for p in &mut paths {
            self.open_all(p, GAP_RCPT, false);
        }
        // rcpt
        let renv = self.env_for(Stage::Rcpt, RUN_RCPT);
        let ends = self.run_open(Stage::Rcpt, &renv, paths);
        let r_sym = match &renv.rcpt {
            Some(r) => r.addr.clone(),
            None => Term::default(),
        };
        let mut after_rcpt: Vec<(Path, Option<Term>, String, Option<LocId>, End, bool)> = Vec::new();
        for (mut p, end, at) in ends {
            let end = if end == End::Refuse && warn { End::Default } else { end };
            // The recipient's address after the rcpt stage's rewrites.
            let mut addr = Some(r_sym.clone());
            let mut sinks_ok = true;
            for e in p.effects.clone() {
                match e {
                    super::explore::Eff::Redirect(t) | super::explore::Eff::Rewrite(t) => addr = Some(t),
                    super::explore::Eff::RewriteMap(t) => {
                        let v = self.table_value_sym(t.0, &r_sym);
                        addr = Some(Term::sym(v, View::Whole));
                    }
                    _ => {}
                }
            }
            let (why, legit) = match &end {
                End::Accept => ("the policy accepts it with `accept`".to_string(), false),
                End::AcceptRelay { legit } => ("an `access` table entry says RELAY for it".to_string(), *legit),
                End::Default | End::Deliver(..) => {
                    // The built-in relay rule.
                    let allowed = self.relay_rule(&renv, &p);
                    if allowed == B::Const(false) {
                        continue;
                    }
                    p.cons = allowed.assume(&p.cons);
                    let why = if p.grant {
                        "the stage falls off its end after an `access` table said RELAY for the client".to_string()
                    } else {
                        "the stage falls off its end and the built-in relay rule lets it through".to_string()
                    };
                    (why, false)
                }
                End::Discard => {
                    addr = None;
                    ("".to_string(), false)
                }
                End::Refuse => {
                    sinks_ok = false;
                    ("".to_string(), false)
                }
            };
            if !sinks_ok {
                continue;
            }
            after_rcpt.push((p, addr, why, at, end, legit));
        }
        // The rest of the transaction, data, and the queue.
        let denv_base = self.env_for(Stage::Data, RUN_DATA);
        let mut out = Vec::new();
        for (mut p, addr, why, at, rcpt_end, legit) in after_rcpt {
            let rcpt_effects = std::mem::take(&mut p.effects);
            self.open_all(&mut p, GAP_RCPT, false);
            let mut denv = denv_base.clone();
            if let Some((_, others)) = &denv.recipients {
                denv.recipients = Some((addr.clone(), *others));
            }
            let mut senv = denv.clone();
            senv.rcpt = None;
            let ends = self.run_open(Stage::Data, &denv, vec![p]);
            for (q, dend, _) in ends {
                let dend = if dend == End::Refuse && warn { End::Default } else { dend };
                if !matches!(dend, End::Accept | End::Default) || q.held {
                    continue;
                }
                let mut targets: Vec<(Term, String, bool)> = Vec::new();
                let data_redirect = q.effects.iter().rev().find_map(|e| match e {
                    super::explore::Eff::Redirect(t) => Some(t.clone()),
                    _ => None,
                });
                match (&data_redirect, &addr) {
                    (Some(t), _) => targets.push((t.clone(), "the data stage's `redirect`".into(), false)),
                    (None, Some(a)) => targets.push((a.clone(), "the recipient".into(), legit)),
                    (None, None) => {}
                }
                for e in rcpt_effects.iter().chain(q.effects.iter()) {
                    match e {
                        super::explore::Eff::Bcc(t) => targets.push((t.clone(), "a `bcc`".into(), false)),
                        super::explore::Eff::Alert(to, text)
                            if text.syms().any(|(s, _)| self.w.syms[s as usize].attacker) =>
                        {
                            targets.push((to.clone(), "an `alert`".into(), false))
                        }
                        _ => {}
                    }
                }
                for (t, via, legit) in targets {
                    if legit || !self.attacker_domain(&t) {
                        continue;
                    }
                    let mut qq = q.clone();
                    qq.effects.clear();
                    let session_trace = q.trace.to_vec();
                    for (rp, transport, rtrace) in self.route(&senv, qq, &t, 0) {
                        out.push(RelayEnd {
                            session_trace: session_trace.clone(),
                            path: rp,
                            target: t.clone(),
                            via: via.clone(),
                            why: why.clone(),
                            decided_by: at,
                            transport,
                            route_trace: rtrace,
                            rcpt_end: Some(rcpt_end.clone()),
                        });
                    }
                }
            }
        }
        out
    }

    /// Whether the built-in relay rule lets the recipient through (spec section 11).
    fn relay_rule(&mut self, env: &Env, p: &Path) -> B {
        if p.grant {
            return B::Const(true);
        }
        let nets = B::atom(self.w.atom(self.session.client_ip, AtomKind::Ip(self.networks.clone())));
        let addr = env.rcpt.as_ref().map(|r| r.addr.clone()).unwrap_or_default();
        let d = self.term_view(env.run, &addr, View::Domain);
        let spec = LangSpec::domains(&self.relay_domains, true);
        let local = self.string_test(env.run, &d, &spec);
        B::or(vec![nets, local])
    }

    /// Whether the domain an address goes to can be the attacker's choice: it contains
    /// attacker data after the last literal `@` (or there is none).
    fn attacker_domain(&self, t: &Term) -> bool {
        let at = t.0.iter().rposition(|p| matches!(p, Part::Lit(l) if l.contains('@')));
        let tail = match at {
            Some(i) => &t.0[i + 1..],
            None => &t.0[..],
        };
        tail.iter().any(|p| matches!(p, Part::Sym(s, _) if self.w.syms[*s as usize].attacker))
    }

    /// The route stage for an address, and where that leaves the message: every path that
    /// delivers it to another host with a foreign domain.
    fn route(&mut self, base: &Env, p: Path, addr: &Term, depth: usize) -> Vec<(Path, String, Vec<(LocId, String)>)> {
        let mut out = Vec::new();
        if depth > ROUTE_DEPTH {
            // Nested expansions this deep: assume the worst.
            let foreign = self.foreign(RUN_ROUTE, addr);
            let mut q = p;
            q.cons = foreign.assume(&q.cons);
            out.push((q, "mx (after nested redirects)".into(), Vec::new()));
            return out;
        }
        let run = RUN_ROUTE + depth as u32;
        let mut env = base.clone();
        env.stage = Some(Stage::Route);
        env.run = run;
        env.rcpt = Some(RcptEnv {
            addr: addr.clone(),
            route: None,
            notify: self.w.sym(Origin::Fact { run, fact: "dsn.notify" }, SymKind::List(None), true),
            orcpt: self.str_sym(Origin::Fact { run, fact: "dsn.orcpt" }, None, true),
        });
        let start = Path { trace: Trace::default(), effects: Vec::new(), ..p };
        let ends = self.run_open(Stage::Route, &env, vec![start]);
        // Rewritten addresses routed anew, followed after this run's own ends so that the
        // simplest counterexample comes first.
        let mut rerouted_ends: Vec<(Path, Term)> = Vec::new();
        for (q, end, _) in ends {
            let rtrace = q.trace.to_vec();
            let mut address = addr.clone();
            let mut rerouted = false;
            // The runtime routes a rewritten recipient anew (runtime/engine/src/routing.rs); when the
            // rewrite leaves the address as it was, this run's own verdict stands. Both are
            // followed.
            let mut rewrote = false;
            let mut forks: Vec<(Path, Option<Term>)> = vec![(q.clone(), None)];
            for e in q.effects.clone() {
                match e {
                    super::explore::Eff::Expand(t) => {
                        // Found: the members are routed instead (a member without a domain gets
                        // this address's domain); not found: this address goes on.
                        let found = self.table_has(run, t.0, addr);
                        let mut next = Vec::new();
                        for (f, r) in forks {
                            if r.is_some() {
                                next.push((f, r));
                                continue;
                            }
                            let mut yes = f.clone();
                            yes.cons = found.clone().assume(&yes.cons);
                            let member = self.member_term(t.0, addr, run);
                            next.push((yes, Some(member)));
                            let mut no = f;
                            no.cons = found.clone().not().assume(&no.cons);
                            next.push((no, None));
                        }
                        forks = next;
                    }
                    super::explore::Eff::Redirect(t) => {
                        for f in forks.iter_mut() {
                            if f.1.is_none() {
                                f.1 = Some(t.clone());
                            }
                        }
                        rerouted = true;
                    }
                    super::explore::Eff::Rewrite(t) => {
                        address = t;
                        rewrote = true;
                    }
                    super::explore::Eff::RewriteMap(t) => {
                        let v = self.table_value_sym(t.0, addr);
                        address = Term::sym(v, View::Whole);
                        rewrote = true;
                    }
                    super::explore::Eff::Bcc(t) => {
                        if self.attacker_domain(&t) {
                            let qq = Path { effects: Vec::new(), ..q.clone() };
                            for x in self.route(base, qq, &t, depth + 1) {
                                out.push(x);
                            }
                        }
                    }
                    _ => {}
                }
            }
            let _ = rerouted;
            for (f, reroute) in forks {
                if let Some(next) = reroute {
                    if self.attacker_domain(&next) {
                        let ff = Path { effects: Vec::new(), ..f };
                        out.extend(self.route(base, ff, &next, depth + 1));
                    }
                    continue;
                }
                if rewrote && self.attacker_domain(&address) {
                    rerouted_ends.push((Path { effects: Vec::new(), ..f.clone() }, address.clone()));
                }
                let kind = match &end {
                    End::Deliver(k, _) => *k,
                    End::Default | End::Accept | End::AcceptRelay { .. } => TransportKind::Mx,
                    End::Refuse | End::Discard => continue,
                };
                if !matches!(kind, TransportKind::Mx | TransportKind::Smtp) {
                    continue;
                }
                if !self.attacker_domain(&address) {
                    continue;
                }
                let foreign = self.foreign(run, &address);
                if foreign == B::Const(false) {
                    continue;
                }
                let mut ff = f;
                ff.cons = foreign.assume(&ff.cons);
                let how = match &end {
                    End::Deliver(TransportKind::Smtp, Some(d)) => format!("smtp {}", render_term(d)),
                    End::Deliver(TransportKind::Smtp, None) => "smtp".into(),
                    End::Deliver(..) => "mx".into(),
                    _ => "mx (the route stage falls off its end)".into(),
                };
                out.push((ff, how, rtrace.clone()));
            }
        }
        for (f, next) in rerouted_ends {
            out.extend(self.route(base, f, &next, depth + 1));
        }
        out
    }

    /// The address's domain is neither local nor a relay domain.
    fn foreign(&mut self, run: u32, t: &Term) -> B {
        let d = self.term_view(run, t, View::Domain);
        let spec = LangSpec::domains(&self.owned_domains, true);
        self.string_test(run, &d, &spec).not()
    }

    fn table_has(&mut self, run: u32, t: u32, key: &Term) -> B {
        // `expand` looks the whole address up, then its local part.
        let whole = self.table_in_term(run, t, key);
        let local = self.term_view(run, key, View::Local);
        let l = self.table_in_term(run, t, &local);
        B::or(vec![whole, l])
    }

    fn table_in_term(&mut self, run: u32, t: u32, key: &Term) -> B {
        match self.tables.get(t as usize).and_then(Option::as_ref) {
            Some(super::Known::Keys(keys)) => {
                let ks: Vec<&str> = keys.iter().map(|(k, _)| k).collect();
                if ks.is_empty() {
                    return B::Const(false);
                }
                self.string_test(run, key, &LangSpec::exact(&ks))
            }
            _ => {
                let s = self.w.sym(Origin::TableHas { table: t, key: format!("{key:?}") }, SymKind::Bool, false);
                B::atom(self.w.atom(s, AtomKind::True))
            }
        }
    }

    /// A member of an expansion: the administrator's text, with this address's domain
    /// when it has none (the worst case when the table is not known).
    fn member_term(&mut self, t: u32, addr: &Term, run: u32) -> Term {
        let all_full = match self.tables.get(t as usize).and_then(Option::as_ref) {
            Some(super::Known::Keys(keys)) => {
                keys.iter().all(|(_, v)| v.split(',').map(str::trim).filter(|m| !m.is_empty()).all(|m| m.contains('@')))
            }
            _ => false,
        };
        let m = self.table_value_sym(t, addr);
        if all_full {
            return Term::sym(m, View::Whole);
        }
        let mut out = Term::sym(m, View::Local);
        out.push(Part::Lit("@".into()));
        out.extend(&self.term_view(run, addr, View::Domain));
        out
    }
}

/// The symbols a run's command carries (its HELO name, sender, recipient ...).
fn env_syms(env: &Env) -> Vec<SymId> {
    let mut out = Vec::new();
    if let Some((t, _)) = &env.helo {
        out.extend(t.syms().map(|(s, _)| s));
    }
    if let Some(s) = env.sender {
        out.push(s);
    }
    if let Some(r) = &env.rcpt {
        out.extend(r.addr.syms().map(|(s, _)| s));
        if let Some(x) = r.route {
            out.push(x);
        }
    }
    if let Some(m) = env.auth_mech {
        out.push(m);
    }
    out
}

pub fn conj_and(a: &Conj, b: &Conj) -> Conj {
    let lits: Vec<Lit> = b.iter().cloned().collect();
    lits.into_iter().rev().fold(a.clone(), |c, l| c.with(l))
}

fn conj_eq(a: &Conj, b: &Conj) -> bool {
    let x: Vec<&Lit> = a.iter().collect();
    let y: Vec<&Lit> = b.iter().collect();
    x.len() == y.len() && x.iter().zip(y.iter()).all(|(l, m)| lit_eq(l, m))
}

fn lit_eq(a: &Lit, b: &Lit) -> bool {
    match (a, b) {
        (Lit::Atom(x, p), Lit::Atom(y, q)) => x == y && p == q,
        (Lit::Or(u), Lit::Or(v)) => u.len() == v.len() && u.iter().zip(v).all(|(c, d)| conj_eq(c, d)),
        _ => false,
    }
}

pub fn render_term(t: &Term) -> String {
    t.0.iter()
        .map(|p| match p {
            Part::Lit(l) => l.clone(),
            Part::Sym(..) => "${...}".to_string(),
        })
        .collect()
}

fn walk_val(v: &Val, out: &mut Vec<u32>) {
    match v {
        Val::Var(i) => out.push(i.0),
        Val::Lookup { key, .. } | Val::Rate { key, .. } | Val::Concurrent { key } => walk_val(key, out),
        _ => {}
    }
}

fn walk_tpl(t: &Template, out: &mut Vec<u32>) {
    for p in &t.0 {
        if let crate::ir::Part::Val(v) = p {
            walk_val(v, out);
        }
    }
}

pub fn expr_vars(prog: &Program, id: ExprId, out: &mut Vec<u32>) {
    match prog.expr(id) {
        Expr::Not(i) => expr_vars(prog, *i, out),
        Expr::All(v) | Expr::Any(v) => v.iter().for_each(|i| expr_vars(prog, *i, out)),
        Expr::Truth(v) | Expr::IsNull(v) | Expr::Resolvable(v) | Expr::Fqdn(v) => walk_val(v, out),
        Expr::Match { lhs, rhs, .. } => {
            walk_val(lhs, out);
            rhs.iter().for_each(|t| walk_tpl(t, out));
        }
        Expr::Pattern { lhs, .. } | Expr::In { lhs, .. } | Expr::Cmp { lhs, .. } => walk_val(lhs, out),
        Expr::CmpVal { lhs, rhs, .. } => {
            walk_val(lhs, out);
            walk_val(rhs, out);
        }
        Expr::Flag(v) => out.push(v.0),
        Expr::Rhsbl { domain, .. } => walk_val(domain, out),
        _ => {}
    }
}

fn action_templates(a: &Action) -> Vec<&Template> {
    match a {
        Action::Reject(r) | Action::Tempfail(r) => vec![&r.text],
        Action::Set { value: Some(t), .. } => vec![t],
        Action::Log(t) | Action::Redirect(t) | Action::Bcc(t) | Action::Archive(t) => vec![t],
        Action::HeaderAdd { value, .. } | Action::HeaderReplace { value, .. } => vec![value],
        Action::Hold(Some(t)) => vec![t],
        Action::Filter(t) | Action::Deliver(t) => t.dest.iter().collect(),
        Action::RewriteSender(Rewrite::To(t)) | Action::RewriteRecipient(Rewrite::To(t)) => vec![t],
        Action::Alert { to, text, .. } => vec![to, text],
        _ => Vec::new(),
    }
}
