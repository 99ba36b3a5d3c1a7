//! One stage program run symbolically: every test whose outcome depends on a symbol forks
//! the path (the test, and its negation, join the path's constraint); paths that meet at
//! the same instruction with the same variables are joined, so a policy of thousands of
//! independent rules costs a pass, not a product. What facts are lives in `facts.rs`, how
//! tests become atoms in `compare.rs`, `access` in `access.rs`.

use std::collections::BTreeMap;
use std::rc::Rc;

use super::sym::{AtomKind, Conj, LangSpec, Origin, SymId, SymKind, Value, View};
use super::term::{Term, B, V};
use super::witness::Meaning;
use super::Prover;
use crate::ir::*;

/// What a variable holds on a path.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Shape {
    Unset,
    Set(Term),
    /// Unknown: maybe set (`.1`, a yes/no symbol), to any string (`.0`).
    Any(SymId, SymId),
    /// Kept from the path, or replaced by a command not on the path (a gap): decided at
    /// the first read, among the current shape and the values commands of `class` write.
    /// `.1` is the set of stages (`Stage::bit`) whose runs the gap may hold.
    Open(Box<Shape>, u16),
}

/// Effects of a run that decide where the message goes.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Eff {
    Redirect(Term),
    Bcc(Term),
    Rewrite(Term),
    /// `rewrite recipient TABLE`: the administrator's value (or none).
    RewriteMap(TableId),
    Expand(TableId),
    Alert(Term, Term),
    Hold,
}

/// How a run ended.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum End {
    Default,
    Accept,
    /// An access table said RELAY: at connect/helo/auth the session may relay; at rcpt the
    /// recipient is accepted (`legit`: the entry names a domain or an address, as a relay
    /// domain would).
    AcceptRelay {
        legit: bool,
    },
    Refuse,
    Discard,
    Deliver(TransportKind, Option<Term>),
}

/// A persistent trace of decisions: (rule, what happened).
#[derive(Clone, Debug, Default)]
pub struct Trace(Option<Rc<(LocId, String, Trace)>>);

impl Drop for Trace {
    fn drop(&mut self) {
        let mut next = self.0.take();
        while let Some(n) = next {
            match Rc::try_unwrap(n) {
                Ok((_, _, mut rest)) => next = rest.0.take(),
                Err(_) => break,
            }
        }
    }
}

impl Trace {
    pub fn with(&self, loc: LocId, what: String) -> Trace {
        Trace(Some(Rc::new((loc, what, self.clone()))))
    }
    pub fn to_vec(&self) -> Vec<(LocId, String)> {
        let mut out = Vec::new();
        let mut cur = self.0.as_ref();
        while let Some(n) = cur {
            out.push((n.0, n.1.clone()));
            cur = n.2 .0.as_ref();
        }
        out.reverse();
        out
    }
}

/// A choice made at a gap: `var` holds gap shape `shape`, instantiated with `copies`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct GapUse {
    pub var: u32,
    /// The gap shape chosen, or None: the value the path gave it.
    pub shape: Option<usize>,
    pub copies: Vec<(SymId, SymId)>,
    pub value: Shape,
}

#[derive(Clone, Debug)]
pub struct Path {
    pub cons: Conj,
    pub vars: Vec<Shape>,
    /// An access table said RELAY for this client at connect/helo/auth.
    pub grant: bool,
    pub tls: bool,
    pub held: bool,
    pub effects: Vec<Eff>,
    pub trace: Trace,
    pub gaps: Vec<GapUse>,
}

impl Path {
    fn key(&self) -> (Vec<Shape>, bool, bool, bool, Vec<Eff>, Vec<GapUse>) {
        (self.vars.clone(), self.grant, self.tls, self.held, self.effects.clone(), self.gaps.clone())
    }
}

/// What the facts of one run are.
#[derive(Clone, Debug, Default)]
pub struct Env {
    pub stage: Option<Stage>,
    pub run: u32,
    pub helo: Option<(Term, B)>,
    pub sender: Option<SymId>,
    pub mail: Option<MailEnv>,
    pub rcpt: Option<RcptEnv>,
    /// Data and later: the tracked recipient (if any) and the list of the others.
    pub recipients: Option<(Option<Term>, SymId)>,
    pub message: bool,
    /// A failed AUTH: the mechanism tried.
    pub auth_mech: Option<SymId>,
}

#[derive(Clone, Debug)]
pub struct MailEnv {
    pub size: SymId,
    pub body: SymId,
    pub utf8: SymId,
    pub ret: SymId,
    pub envid: SymId,
}

#[derive(Clone, Debug)]
pub struct RcptEnv {
    pub addr: Term,
    /// A source route was given (session rcpt only).
    pub route: Option<SymId>,
    pub notify: SymId,
    pub orcpt: SymId,
}

/// The comparison of a test, independent of its left side.
#[derive(Clone, Debug)]
pub(super) enum Op {
    Match(MatchOp, Vec<Term>),
    Pattern(Vec<PatId>),
    In(SetRef),
    Cmp(CmpOp, f64),
    IsNull,
}

/// Paths waiting at one instruction before they are joined.
const JOIN_PRUNE: usize = 64;
const JOIN_WIDEN: usize = 512;
/// Terms longer than this are widened to an unknown string (a variable copied into itself).
const TERM_PARTS: usize = 16;

pub type Ends = Vec<(Path, End, Option<LocId>)>;

impl Prover<'_> {
    /// Run one stage program from the given paths; every end reached.
    pub fn run(&mut self, stage: Stage, env: &Env, start: Vec<Path>) -> Ends {
        let prog = self.prog;
        let code = prog.stage(stage);
        let mut at: BTreeMap<usize, Vec<Path>> = BTreeMap::new();
        at.insert(0, start);
        let mut out = Vec::new();
        while let Some((pc, paths)) = at.pop_first() {
            self.work += paths.len();
            let paths = self.join(paths);
            let Some(instr) = code.get(pc) else {
                for p in paths {
                    out.push((p, End::Default, None));
                }
                continue;
            };
            for p in paths {
                match instr {
                    Instr::Jump(t) => at.entry(*t as usize).or_default().push(p),
                    Instr::If { cond, else_pc, loc } => {
                        let (b, p) = self.cond(env, p, *cond);
                        match b {
                            B::Const(true) => at.entry(pc + 1).or_default().push(p),
                            B::Const(false) => at.entry(*else_pc as usize).or_default().push(p),
                            b => {
                                let mut yes = p.clone();
                                yes.cons = b.assume(&p.cons);
                                yes.trace = yes.trace.with(*loc, "true".into());
                                let mut no = p;
                                no.cons = b.not().assume(&no.cons);
                                no.trace = no.trace.with(*loc, "false".into());
                                at.entry(pc + 1).or_default().push(yes);
                                at.entry(*else_pc as usize).or_default().push(no);
                            }
                        }
                    }
                    Instr::Do { action, loc } => {
                        for (q, end) in self.act(stage, env, p, action, *loc) {
                            match end {
                                None => at.entry(pc + 1).or_default().push(q),
                                Some(e) => out.push((q, e, Some(*loc))),
                            }
                        }
                    }
                }
            }
        }
        out
    }

    /// Join paths with the same variables and effects; drop impossible ones when many wait.
    fn join(&mut self, paths: Vec<Path>) -> Vec<Path> {
        if paths.len() <= 1 {
            return paths;
        }
        let mut groups: Vec<Path> = Vec::new();
        let mut index: std::collections::HashMap<_, usize> = std::collections::HashMap::new();
        for p in paths {
            let k = p.key();
            match index.get(&k) {
                Some(i) => {
                    let g = &mut groups[*i];
                    g.cons = Conj::hull(&g.cons, &p.cons);
                }
                None => {
                    index.insert(k, groups.len());
                    groups.push(p);
                }
            }
        }
        if groups.len() > JOIN_PRUNE {
            groups.retain(|p| self.w.possible(&p.cons));
        }
        if groups.len() > JOIN_WIDEN {
            groups = self.widen(groups);
        }
        groups
    }

    /// Too many different variable states: forget which variable holds what (each becomes
    /// unknown where the paths disagree), and join.
    fn widen(&mut self, groups: Vec<Path>) -> Vec<Path> {
        self.widened = true;
        let Some(first) = groups.first().cloned() else { return groups };
        let mut vars = first.vars.clone();
        for (i, v) in vars.iter_mut().enumerate() {
            if groups.iter().any(|g| g.vars[i] != *v) {
                let val = self.w.sym(Origin::World { what: format!("widened:{i}"), run: 0 }, SymKind::Str(None), true);
                let set = self.w.sym(Origin::World { what: format!("widened-set:{i}"), run: 0 }, SymKind::Bool, true);
                *v = Shape::Any(val, set);
            }
        }
        let mut by: std::collections::HashMap<_, Path> = std::collections::HashMap::new();
        for mut g in groups {
            g.vars = vars.clone();
            let k = (g.grant, g.tls, g.held, g.effects.clone(), g.gaps.clone());
            match by.get_mut(&k) {
                Some(x) => x.cons = Conj::hull(&x.cons, &g.cons),
                None => {
                    by.insert(k, g);
                }
            }
        }
        by.into_values().collect()
    }

    // ---- values -------------------------------------------------------------------------

    pub fn str_sym(&mut self, origin: Origin, base: Option<LangSpec>, attacker: bool) -> SymId {
        self.w.sym(origin, SymKind::Str(base), attacker)
    }
    pub(super) fn num_sym(&mut self, origin: Origin, lo: i64, hi: i64) -> SymId {
        self.w.sym(origin, SymKind::Num(super::sets::NumSet::range(lo, hi)), false)
    }
    pub(super) fn bool_sym(&mut self, origin: Origin, attacker: bool) -> SymId {
        self.w.sym(origin, SymKind::Bool, attacker)
    }
    /// An undecided yes/no, the same for the same `what` in the same run.
    pub fn opaque(&mut self, run: u32, what: String) -> B {
        let s = self.bool_sym(Origin::World { what, run }, true);
        B::atom(self.w.atom(s, AtomKind::True))
    }
    pub(super) fn truth(&mut self, s: SymId) -> B {
        B::atom(self.w.atom(s, AtomKind::True))
    }

    pub(super) fn cond(&mut self, env: &Env, p: Path, id: ExprId) -> (B, Path) {
        // Open variables were resolved when the run started (`run_open`, session.rs).
        self.expr(env, p, id)
    }

    pub(super) fn expr(&mut self, env: &Env, p: Path, id: ExprId) -> (B, Path) {
        let e = self.prog.expr(id).clone();
        match e {
            Expr::Const(b) => (B::Const(b), p),
            Expr::Not(i) => {
                let (b, p) = self.expr(env, p, i);
                (b.not(), p)
            }
            Expr::All(ids) => {
                let mut p = p;
                let mut v = Vec::new();
                for i in ids {
                    let (b, q) = self.expr(env, p, i);
                    p = q;
                    if b == B::Const(false) {
                        return (b, p);
                    }
                    v.push(b);
                }
                (B::and(v), p)
            }
            Expr::Any(ids) => {
                let mut p = p;
                let mut v = Vec::new();
                for i in ids {
                    let (b, q) = self.expr(env, p, i);
                    p = q;
                    if b == B::Const(true) {
                        return (b, p);
                    }
                    v.push(b);
                }
                (B::or(v), p)
            }
            Expr::Truth(v) => {
                let (x, p) = self.val(env, p, &v);
                (
                    match x {
                        V::Bool(b) => b,
                        _ => B::Const(false),
                    },
                    p,
                )
            }
            Expr::Match { lhs, op, rhs } => {
                let (l, mut p) = self.val(env, p, &lhs);
                let mut terms = Vec::new();
                for t in &rhs {
                    let (x, q) = self.render(env, p, t);
                    p = q;
                    terms.push(x);
                }
                (self.test(env.run, &l, &Op::Match(op, terms), id), p)
            }
            Expr::Pattern { lhs, pats } => {
                let (l, p) = self.val(env, p, &lhs);
                (self.test(env.run, &l, &Op::Pattern(pats), id), p)
            }
            Expr::In { lhs, set } => {
                let (l, p) = self.val(env, p, &lhs);
                (self.test(env.run, &l, &Op::In(set), id), p)
            }
            Expr::Cmp { lhs, op, rhs } => {
                let scale = if matches!(lhs, Val::Score(_)) { 1000.0 } else { 1.0 };
                let (l, p) = self.val(env, p, &lhs);
                (self.test(env.run, &l, &Op::Cmp(op, rhs * scale), id), p)
            }
            Expr::CmpVal { lhs, rhs, .. } => {
                // A limit known only at run time: either outcome is possible.
                let (l, p) = self.val(env, p, &lhs);
                let (r, p) = self.val(env, p, &rhs);
                (self.opaque(env.run, format!("cmpval:{}:{l:?}:{r:?}", id.0)), p)
            }
            Expr::IsNull(v) => {
                let (l, p) = self.val(env, p, &v);
                (self.test(env.run, &l, &Op::IsNull, id), p)
            }
            Expr::Flag(var) => {
                let shape = p.vars.get(var.index()).cloned().unwrap_or(Shape::Unset);
                let b = match shape {
                    Shape::Unset => B::Const(false),
                    Shape::Set(_) => B::Const(true),
                    Shape::Any(_, set) => self.truth(set),
                    Shape::Open(..) => B::Const(false),
                };
                (b, p)
            }
            Expr::Dnsbl { zone, returns } => {
                let r: Vec<String> = returns.iter().map(|s| self.prog.str(*s).to_string()).collect();
                let z = self.prog.str(zone).to_string();
                let what = format!("dnsbl:{z}:{}", r.join(","));
                (self.dns_yes(env.run, what, Meaning::Dnsbl { zone: z, returns: r }), p)
            }
            Expr::Rhsbl { zone, domain, returns } => {
                let (d, p) = self.val(env, p, &domain);
                let t = self.to_term(env.run, &d);
                if t.is_empty() {
                    return (B::Const(false), p);
                }
                let r: Vec<String> = returns.iter().map(|s| self.prog.str(*s).to_string()).collect();
                let z = self.prog.str(zone).to_string();
                let what = format!("rhsbl:{z}:{}:{t:?}", r.join(","));
                (self.dns_yes(env.run, what, Meaning::Rhsbl { zone: z, domain: t, returns: r }), p)
            }
            Expr::Resolvable(v) => {
                let (d, p) = self.val(env, p, &v);
                let t = self.to_term(env.run, &d);
                if t.is_empty() {
                    return (B::Const(false), p);
                }
                (self.dns_yes(env.run, format!("resolvable:{t:?}"), Meaning::Resolvable(t)), p)
            }
            Expr::Fqdn(v) => {
                let (d, p) = self.val(env, p, &v);
                let t = self.to_term(env.run, &d);
                // `address::is_fqdn`: the shape, the length (253 without one trailing dot),
                // and a last label that is not all digits.
                let shape = self.string_test(env.run, &t, &LangSpec::bytes(FQDN_SHAPE.into(), View::Whole));
                let len = self.string_test(env.run, &t, &LangSpec::bytes(FQDN_LEN.into(), View::Whole));
                let digits = self.string_test(env.run, &t, &LangSpec::bytes(FQDN_DIGITS.into(), View::Whole));
                (B::and(vec![shape, len, digits.not()]), p)
            }
            Expr::BatvValid | Expr::LoginMismatch(_) => (B::Const(false), p),
            Expr::Callahead => {
                let a = env.rcpt.as_ref().map(|r| r.addr.clone()).unwrap_or_default();
                (self.dns_yes(env.run, format!("callahead:{a:?}"), Meaning::Callahead(a)), p)
            }
            Expr::Greylist { delay_ms, .. } => {
                (self.dns_yes(env.run, format!("greylist:{delay_ms}"), Meaning::Greylist { delay_ms }), p)
            }
        }
    }

    /// A yes/no answer from the outside world (DNS, call-ahead, greylisting).
    pub(super) fn dns_yes(&mut self, run: u32, query: String, meaning: Meaning) -> B {
        let s = self.bool_sym(Origin::Dns { query, run }, true);
        self.mean(s, meaning);
        self.truth(s)
    }

    /// Record what a symbol means for the counterexample.
    pub fn mean(&mut self, s: SymId, m: Meaning) {
        if !self.meanings.iter().any(|(x, _)| *x == s) {
            self.meanings.push((s, m));
        }
    }

    pub fn default_value(&self, sym: SymId) -> Value {
        self.w.default_of(sym)
    }

    // ---- tests --------------------------------------------------------------------------

    pub(super) fn act(&mut self, stage: Stage, env: &Env, p: Path, a: &Action, loc: LocId) -> Vec<(Path, Option<End>)> {
        let one = |p: Path, e: Option<End>| vec![(p, e)];
        match a {
            Action::Accept => {
                let p = Path { trace: p.trace.with(loc, "accept".into()), ..p };
                one(p, Some(End::Accept))
            }
            Action::Reject(_) | Action::Tempfail(_) | Action::RejectCallahead => {
                let p = Path { trace: p.trace.with(loc, "refuse".into()), ..p };
                one(p, Some(End::Refuse))
            }
            Action::Discard => one(p, Some(End::Discard)),
            Action::Stop => {
                let p = Path { trace: p.trace.with(loc, "stop".into()), ..p };
                one(p, Some(End::Default))
            }
            Action::Deliver(t) => {
                let (dest, p) = match &t.dest {
                    Some(d) => {
                        let (x, p) = self.render(env, p, d);
                        (Some(x), p)
                    }
                    None => (None, p),
                };
                one(p, Some(End::Deliver(t.kind, dest)))
            }
            Action::Set { var, value } => {
                let (shape, mut p) = match value {
                    None => (Shape::Set(Term::lit("1")), p),
                    Some(t) => {
                        let (x, p) = self.render(env, p, t);
                        if x.len() > TERM_PARTS {
                            let s = self.str_sym(
                                Origin::World { what: format!("long:{}", var.0), run: env.run },
                                None,
                                true,
                            );
                            let set =
                                self.bool_sym(Origin::World { what: format!("long-set:{}", var.0), run: 0 }, false);
                            // A long value is still a set variable.
                            let _ = set;
                            (Shape::Set(Term::sym(s, View::Whole)), p)
                        } else {
                            (Shape::Set(x), p)
                        }
                    }
                };
                if let Some(slot) = p.vars.get_mut(var.index()) {
                    *slot = shape;
                }
                p.trace = p.trace.with(loc, "set".into());
                one(p, None)
            }
            Action::Unset(var) => {
                let mut p = p;
                if let Some(slot) = p.vars.get_mut(var.index()) {
                    *slot = Shape::Unset;
                }
                one(p, None)
            }
            Action::Redirect(t) | Action::Bcc(t) => {
                let (x, mut p) = self.render(env, p, t);
                p.effects.push(if matches!(a, Action::Redirect(_)) { Eff::Redirect(x) } else { Eff::Bcc(x) });
                one(p, None)
            }
            Action::RewriteRecipient(Rewrite::To(t)) => {
                let (x, mut p) = self.render(env, p, t);
                p.effects.push(Eff::Rewrite(x));
                one(p, None)
            }
            Action::RewriteRecipient(Rewrite::Map(t)) => {
                let mut p = p;
                p.effects.push(Eff::RewriteMap(*t));
                one(p, None)
            }
            Action::Expand(t) => {
                let mut p = p;
                p.effects.push(Eff::Expand(*t));
                one(p, None)
            }
            Action::Alert { to, text, .. } => {
                let (x, p) = self.render(env, p, to);
                let (y, mut p) = self.render(env, p, text);
                p.effects.push(Eff::Alert(x, y));
                one(p, None)
            }
            Action::Hold(_) => {
                let mut p = p;
                p.held = true;
                one(p, None)
            }
            Action::Access(t, delay) => self.access(stage, env, p, t.0, *delay, loc),
            _ => one(p, None),
        }
    }
}

pub(super) fn cmp(n: f64, c: CmpOp, rhs: f64) -> bool {
    match c {
        CmpOp::Eq => n == rhs,
        CmpOp::Ne => n != rhs,
        CmpOp::Lt => n < rhs,
        CmpOp::Le => n <= rhs,
        CmpOp::Gt => n > rhs,
        CmpOp::Ge => n >= rhs,
    }
}

/// `address::is_fqdn`, in three parts (bytes syntax).
pub const FQDN_SHAPE: &str =
    "\\A(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?\\.)+[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?\\.?\\z";
pub const FQDN_LEN: &str = "\\A(?:(?s-u:.){0,253}|(?s-u:.){253}\\.)\\z";
pub const FQDN_DIGITS: &str = "(?:\\A|\\.)[0-9]+\\.?\\z";
