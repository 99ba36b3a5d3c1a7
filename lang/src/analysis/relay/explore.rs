//! One stage program run symbolically: every test whose outcome depends on a symbol forks
//! the path (the test, and its negation, join the path's constraint); paths that meet at
//! the same instruction with the same variables are joined, so a policy of thousands of
//! independent rules costs a pass, not a product. In *concrete* mode (a model is set)
//! every test is decided by the model's values instead, which replays one session.

use std::collections::BTreeMap;
use std::rc::Rc;

use super::auto;
use super::sym::{AtomKind, Conj, LangSpec, Origin, SymId, SymKind, Value, View};
use super::term::{IpV, ListV, NumV, Part, Term, B, V};
use super::witness::Meaning;
use super::{Known, Prover};
use crate::access::{self as acc, AccessAction};
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
enum Op {
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
    fn num_sym(&mut self, origin: Origin, lo: i64, hi: i64) -> SymId {
        self.w.sym(origin, SymKind::Num(super::sets::NumSet::range(lo, hi)), false)
    }
    fn bool_sym(&mut self, origin: Origin, attacker: bool) -> SymId {
        self.w.sym(origin, SymKind::Bool, attacker)
    }
    /// An undecided yes/no, the same for the same `what` in the same run.
    pub fn opaque(&mut self, run: u32, what: String) -> B {
        let s = self.bool_sym(Origin::World { what, run }, true);
        B::atom(self.w.atom(s, AtomKind::True))
    }
    fn truth(&mut self, s: SymId) -> B {
        B::atom(self.w.atom(s, AtomKind::True))
    }

    fn fact(&mut self, env: &Env, p: &Path, f: Fact) -> V {
        use Fact::*;
        let run = env.run;
        let lit = |s: &str| V::Str(Term::lit(s));
        match f {
            True => V::Bool(B::Const(true)),
            False => V::Bool(B::Const(false)),
            ClientIp => V::Ip(IpV::Sym(self.session.client_ip)),
            ClientPort => V::Num(NumV::Sym(self.session.client_port)),
            ClientName => V::Str(Term::sym(self.session.client_name, View::Whole)),
            ClientPtr => V::Str(Term::sym(self.session.client_ptr, View::Whole)),
            ClientNetwork => {
                V::Str(Term::sym(self.str_sym(Origin::Fact { run, fact: "client.network" }, None, true), View::Whole))
            }
            ClientFcrdns => {
                let a = self.w.atom(self.session.client_name, AtomKind::Lang(LangSpec::exact(&["unknown"])));
                V::Bool(B::Lit(a, false))
            }
            LocalIp => V::Ip(IpV::Sym(self.session.local_ip)),
            LocalPort => V::Num(NumV::Const(self.listener.local_port as i64)),
            Listener => lit(self.listener.name.as_deref().unwrap_or("")),
            SessionId => V::Str(Term::sym(self.session.session_id, View::Whole)),
            SessionErrors => {
                let hi = self.listener.hard_error_limit.saturating_sub(1) as i64;
                V::Num(NumV::Sym(self.num_sym(Origin::Fact { run, fact: "session.errors" }, 0, hi)))
            }
            Tls => V::Bool(B::Const(p.tls)),
            TlsVersion | TlsCipher if !p.tls => lit(""),
            TlsVersion => {
                let base = LangSpec::exact(&["TLSv1.2", "TLSv1.3"]);
                V::Str(Term::sym(
                    self.str_sym(Origin::Fact { run, fact: "tls.version" }, Some(base), true),
                    View::Whole,
                ))
            }
            TlsCipher => {
                V::Str(Term::sym(self.str_sym(Origin::Fact { run, fact: "tls.cipher" }, None, true), View::Whole))
            }
            TlsClientCert if p.tls && self.listener.public_client_certs => {
                V::Bool(B::atom(self.w.atom(self.session.client_cert, AtomKind::True)))
            }
            TlsClientCert => V::Bool(B::Const(false)),
            TlsClientFingerprint if p.tls && self.listener.public_client_certs => {
                V::Str(Term::sym(self.session.fingerprint, View::Whole))
            }
            TlsClientFingerprint => lit(""),
            HeloName => match &env.helo {
                Some((t, _)) => V::Str(t.clone()),
                None => lit(""),
            },
            HeloExtended => match &env.helo {
                Some((_, b)) => V::Bool(b.clone()),
                None => V::Bool(B::Const(false)),
            },
            Authenticated => V::Bool(B::Const(false)),
            AuthUser => lit(""),
            AuthMechanism => match env.auth_mech {
                Some(s) => V::Str(Term::sym(s, View::Whole)),
                None => lit(""),
            },
            Sender | SenderLocal | SenderDomain => match env.sender {
                Some(s) => V::Str(Term::sym(
                    s,
                    match f {
                        Sender => View::Whole,
                        SenderLocal => View::Local,
                        _ => View::Domain,
                    },
                )),
                None => lit(""),
            },
            MailSize => match &env.mail {
                Some(m) => V::Num(NumV::Sym(m.size)),
                None => V::Num(NumV::Const(0)),
            },
            MailBody => match &env.mail {
                Some(m) => V::Str(Term::sym(m.body, View::Whole)),
                None => lit(""),
            },
            MailSmtputf8 => match &env.mail {
                Some(m) => V::Bool(self.truth(m.utf8)),
                None => V::Bool(B::Const(false)),
            },
            DsnRet => match &env.mail {
                Some(m) => V::Str(Term::sym(m.ret, View::Whole)),
                None => lit(""),
            },
            DsnEnvid => match &env.mail {
                Some(m) => V::Str(Term::sym(m.envid, View::Whole)),
                None => lit(""),
            },
            Recipient | RecipientLocal | RecipientDomain | RecipientDetail => match &env.rcpt {
                Some(r) => {
                    let view = match f {
                        Recipient => View::Whole,
                        RecipientLocal => View::Local,
                        RecipientDomain => View::Domain,
                        _ => View::Detail,
                    };
                    V::Str(self.term_view(run, &r.addr, view))
                }
                None => lit(""),
            },
            RecipientIsLocal => match env.rcpt.clone() {
                Some(r) => {
                    let d = self.term_view(run, &r.addr, View::Domain);
                    let spec = LangSpec::domains(&self.local_domains, true);
                    V::Bool(self.string_test(run, &d, &spec))
                }
                None => V::Bool(B::Const(false)),
            },
            RecipientRouting => match env.rcpt.clone() {
                Some(r) => {
                    let l = self.term_view(run, &r.addr, View::Local);
                    let spec = LangSpec::contains(&["%", "!", "@"]);
                    let mut alts = vec![self.string_test(run, &l, &spec)];
                    if let Some(s) = r.route {
                        alts.push(self.truth(s));
                    }
                    V::Bool(B::or(alts))
                }
                None => V::Bool(B::Const(false)),
            },
            DsnNotify => match &env.rcpt {
                Some(r) => V::List(ListV::Sym(r.notify)),
                None => V::List(ListV::Lits(Vec::new())),
            },
            DsnOrcpt => match &env.rcpt {
                Some(r) => V::Str(Term::sym(r.orcpt, View::Whole)),
                None => lit(""),
            },
            RecipientsCount => {
                let hi = self.listener.max_recipients.saturating_sub(1) as i64;
                V::Num(NumV::Sym(self.num_sym(Origin::Fact { run, fact: "recipients.count" }, 0, hi)))
            }
            Recipients => match &env.recipients {
                Some((Some(m), others)) => V::List(ListV::Recipients { member: m.clone(), others: *others }),
                Some((None, others)) => V::List(ListV::Sym(*others)),
                None => V::List(ListV::Lits(Vec::new())),
            },
            MessageSize => {
                let max = self.max_message_size;
                let r = self.msg_run(run);
                V::Num(NumV::Sym(self.num_sym(Origin::Fact { run: r, fact: "message.size" }, 0, max)))
            }
            Body => V::Str(Term::sym(self.message_str(run, "body"), View::Whole)),
            AttachmentNames => V::List(ListV::Sym(self.message_list(run, "attachment.names"))),
            AttachmentTypes => V::List(ListV::Sym(self.message_list(run, "attachment.types"))),
            QueueId => {
                V::Str(Term::sym(self.str_sym(Origin::Fact { run, fact: "queue.id" }, None, false), View::Whole))
            }
            Spf | Dkim | Dmarc | DmarcPolicy => {
                let (what, words): (&'static str, &[&str]) = match f {
                    Spf => ("spf", &["pass", "fail", "softfail", "neutral", "none", "temperror", "permerror"]),
                    Dkim => ("dkim", &["pass", "fail", "neutral", "none", "temperror", "permerror"]),
                    Dmarc => ("dmarc", &["pass", "fail", "none", "temperror", "permerror"]),
                    _ => ("dmarc.policy", &["none", "quarantine", "reject", ""]),
                };
                let base = LangSpec::exact(words);
                // One answer per message: the host checks once.
                let r = if run >= super::session::RUN_GAP {
                    run
                } else if what == "spf" {
                    super::session::RUN_MAIL
                } else {
                    self.data_run
                };
                V::Str(Term::sym(self.str_sym(Origin::Fact { run: r, fact: what }, Some(base), true), View::Whole))
            }
            DnsblZone | DnsblAnswer | DnsblText => {
                let name = f.info().name;
                V::Str(Term::sym(self.str_sym(Origin::Fact { run, fact: name }, None, true), View::Whole))
            }
            CallaheadCode => V::Num(NumV::Sym(self.num_sym(Origin::Fact { run, fact: "callahead.code" }, 0, 999))),
            CallaheadText => {
                V::Str(Term::sym(self.str_sym(Origin::Fact { run, fact: "callahead.text" }, None, true), View::Whole))
            }
            TimeHour => V::Num(NumV::Sym(self.num_sym(Origin::Fact { run, fact: "time.hour" }, 0, 23))),
            DeliveryCode | DeliveryAttempts => V::Num(NumV::Const(0)),
            QueueAge => V::Num(NumV::Const(0)),
            DeliveryStatus | DeliveryText | DeliveryHost | BounceType | BounceReason => lit(""),
        }
    }

    /// The run whose message a run sees: a gap run its own, the final path the data run's.
    pub fn msg_run(&self, run: u32) -> u32 {
        if run >= super::session::RUN_GAP {
            run
        } else {
            self.data_run
        }
    }
    fn message_str(&mut self, run: u32, what: &'static str) -> SymId {
        let r = self.msg_run(run);
        self.str_sym(Origin::Fact { run: r, fact: what }, None, true)
    }
    fn message_list(&mut self, run: u32, what: &'static str) -> SymId {
        let r = self.msg_run(run);
        self.w.sym(Origin::Fact { run: r, fact: what }, SymKind::List(None), true)
    }

    /// A view of a string value: exact for a symbol read whole or for literal text; for
    /// other values, a fresh unknown string.
    pub fn term_view(&mut self, run: u32, t: &Term, view: View) -> Term {
        if view == View::Whole {
            return t.clone();
        }
        if let Some(s) = t.as_lit() {
            let (local, domain) = crate::address::split(&s);
            return Term::lit(&match view {
                View::Domain => domain,
                View::Local => local.to_string(),
                _ => crate::address::detail(local).to_string(),
            });
        }
        if let [Part::Sym(s, View::Whole)] = t.0.as_slice() {
            return Term::sym(*s, view);
        }
        // The last `@` in literal text with only literal text after it: the split is known.
        let at = t.0.iter().rposition(|p| matches!(p, Part::Lit(l) if l.contains('@')));
        if let Some(i) = at {
            if t.0[i + 1..].iter().all(|p| matches!(p, Part::Lit(_))) {
                let Part::Lit(l) = &t.0[i] else { unreachable!("checked a literal") };
                let cut = l.rfind('@').unwrap_or(0);
                let mut before = Term(t.0[..i].to_vec());
                before.push(Part::Lit(l[..cut].to_string()));
                let mut after = Term::lit(&l[cut + 1..]);
                for p in &t.0[i + 1..] {
                    after.push(p.clone());
                }
                match view {
                    View::Domain => {
                        let d = after.as_lit().unwrap_or_default().to_ascii_lowercase();
                        return Term::lit(&d);
                    }
                    View::Local => return before,
                    _ => {}
                }
            }
        }
        let attacker = t.syms().any(|(s, _)| self.w.syms[s as usize].attacker);
        let key = format!("view:{view:?}:{t:?}");
        Term::sym(self.str_sym(Origin::World { what: key, run }, None, attacker), View::Whole)
    }

    fn val(&mut self, env: &Env, p: Path, v: &Val) -> (V, Path) {
        match v {
            Val::Fact(f) => (self.fact(env, &p, *f), p),
            Val::Var(id) => {
                let (shape, p) = self.read_var(p, id.0);
                let t = match shape {
                    Shape::Set(t) => t,
                    Shape::Any(s, _) => Term::sym(s, View::Whole),
                    _ => Term::default(),
                };
                (V::Str(t), p)
            }
            Val::Header(name) => {
                let n = self.prog.str(*name).to_ascii_lowercase();
                let s = self.w.sym(Origin::Header(format!("{}:{n}", self.msg_run(env.run))), SymKind::List(None), true);
                (V::List(ListV::Sym(s)), p)
            }
            Val::Lookup { table, key } => {
                let (k, p) = self.val(env, p, key);
                let t = self.to_term(env.run, &k);
                (V::Lookup(table.0, t), p)
            }
            Val::Rate { counter, key, window_ms } => {
                let (k, p) = self.val(env, p, key);
                let t = self.to_term(env.run, &k);
                let what = format!("rate:{}:{t:?}:{window_ms}", counter.name());
                let s = self.num_sym(Origin::World { what, run: env.run }, 1, 1 << 40);
                let kname = match key.as_ref() {
                    Val::Fact(f) => f.info().name.to_string(),
                    _ => "value".to_string(),
                };
                self.mean(s, Meaning::Rate { counter: *counter, key: kname, value: t });
                (V::Num(NumV::Sym(s)), p)
            }
            Val::Concurrent { key } => {
                let (k, p) = self.val(env, p, key);
                let t = self.to_term(env.run, &k);
                let s = self.num_sym(Origin::World { what: format!("concurrent:{t:?}"), run: env.run }, 1, 1 << 20);
                let kname = match key.as_ref() {
                    Val::Fact(f) => f.info().name.to_string(),
                    _ => "value".to_string(),
                };
                self.mean(s, Meaning::Concurrent { key: kname, value: t });
                (V::Num(NumV::Sym(s)), p)
            }
            Val::Score(s) => {
                // Scores are kept in thousandths.
                let r = self.msg_run(env.run);
                let sym = self.num_sym(Origin::World { what: format!("score:{}", s.0), run: r }, -(1 << 40), 1 << 40);
                self.mean(sym, Meaning::Score(s.0));
                (V::Num(NumV::Sym(sym)), p)
            }
            Val::Lit(s) => (V::Str(Term::lit(self.prog.str(*s))), p),
        }
    }

    /// A value as text (what `${...}` inserts).
    pub fn to_term(&mut self, run: u32, v: &V) -> Term {
        match v {
            V::Str(t) => t.clone(),
            V::Num(NumV::Const(n)) => Term::lit(&n.to_string()),
            V::Num(NumV::Sym(s)) | V::Ip(IpV::Sym(s)) => Term::sym(*s, View::Whole),
            V::Ip(IpV::Const(ip)) => Term::lit(&ip.to_string()),
            V::Bool(B::Const(b)) => Term::lit(if *b { "true" } else { "false" }),
            V::List(ListV::Lits(l)) => Term::lit(&l.join(", ")),
            V::Lookup(t, k) => match self.lookup_term(*t, k) {
                Some(t) => t,
                None => Term::sym(self.table_value_sym(*t, k), View::Whole),
            },
            other => {
                let attacker = true;
                Term::sym(
                    self.str_sym(Origin::World { what: format!("text:{other:?}"), run }, None, attacker),
                    View::Whole,
                )
            }
        }
    }

    /// The value of a lookup whose key is literal text in a table known now.
    fn lookup_term(&mut self, t: u32, key: &Term) -> Option<Term> {
        let k = key.as_lit()?;
        match self.tables.get(t as usize)? {
            Some(Known::Keys(keys)) => {
                let lk = k.to_ascii_lowercase();
                Some(Term::lit(keys.iter().find(|(x, _)| *x == lk).map(|(_, v)| v.as_str()).unwrap_or("")))
            }
            _ => None,
        }
    }

    pub fn table_value_sym(&mut self, t: u32, key: &Term) -> SymId {
        let s = self.str_sym(Origin::TableValue { table: t, key: format!("{key:?}") }, None, false);
        self.mean(s, Meaning::TableValue { table: t, key: key.clone() });
        s
    }

    pub fn render(&mut self, env: &Env, p: Path, t: &Template) -> (Term, Path) {
        let mut out = Term::default();
        let mut p = p;
        for part in &t.0 {
            match part {
                crate::ir::Part::Lit(s) => out.push(Part::Lit(self.prog.str(*s).to_string())),
                crate::ir::Part::Val(v) => {
                    let (x, q) = self.val(env, p, v);
                    p = q;
                    let t = self.to_term(env.run, &x);
                    out.extend(&t);
                }
            }
        }
        (out, p)
    }

    /// The shape a variable has, deciding an open one (a fork per possibility in
    /// symbolic mode is made by the caller through `open_choices`).
    fn read_var(&mut self, p: Path, var: u32) -> (Shape, Path) {
        let shape = p.vars.get(var as usize).cloned().unwrap_or(Shape::Unset);
        match shape {
            Shape::Open(..) => {
                // Resolved by `resolve_open` before the instruction runs.
                (Shape::Unset, p)
            }
            s => (s, p),
        }
    }

    // ---- conditions ---------------------------------------------------------------------

    fn cond(&mut self, env: &Env, p: Path, id: ExprId) -> (B, Path) {
        // Open variables were resolved when the run started (`run_open`, session.rs).
        self.expr(env, p, id)
    }

    fn expr(&mut self, env: &Env, p: Path, id: ExprId) -> (B, Path) {
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
    fn dns_yes(&mut self, run: u32, query: String, meaning: Meaning) -> B {
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

    fn test(&mut self, run: u32, lhs: &V, op: &Op, id: ExprId) -> B {
        match lhs {
            V::Lookup(t, key) => self.lookup_test(run, *t, key, op, id),
            V::Str(term) => self.str_test(run, term, op, id),
            V::List(l) => self.list_op(run, l, op, id),
            V::Ip(ip) => self.ip_test(run, ip, op, id),
            V::Num(n) => match op {
                Op::Cmp(c, rhs) => self.num_test(n, *c, *rhs),
                Op::IsNull => B::Const(false),
                _ => {
                    let t = self.to_term(run, lhs);
                    self.str_test(run, &t, op, id)
                }
            },
            V::Bool(b) => match op {
                Op::IsNull => B::Const(false),
                Op::Cmp(c, rhs) => self.num_test(&NumV::Const(0), *c, *rhs),
                _ => match b {
                    B::Const(v) => self.str_test(run, &Term::lit(if *v { "true" } else { "false" }), op, id),
                    _ => self.opaque(run, format!("bool-test:{}:{b:?}", id.0)),
                },
            },
        }
    }

    /// The language of a string comparison.
    fn op_spec(&self, op: &Op) -> Option<Vec<LangSpec>> {
        Some(match op {
            Op::Match(m, terms) => {
                let lits: Option<Vec<String>> = terms.iter().map(|t| t.as_lit()).collect();
                let lits = lits?;
                let refs: Vec<&str> = lits.iter().map(String::as_str).collect();
                if refs.is_empty() {
                    return Some(Vec::new());
                }
                vec![match m {
                    MatchOp::Is => LangSpec::exact(&refs),
                    MatchOp::Contains => LangSpec::contains(&refs),
                }]
            }
            Op::Pattern(pats) => pats
                .iter()
                .filter_map(|p| self.prog.patterns.get(p.index()))
                .map(|p| LangSpec {
                    pattern: p.source.clone(),
                    syntax: auto::Syntax::Policy,
                    view: View::Whole,
                    prefix: Vec::new(),
                    suffix: Vec::new(),
                    fast: None,
                })
                .collect(),
            Op::In(SetRef::Strings(items)) => {
                let items: Vec<&str> = items.iter().map(|s| self.prog.str(*s)).collect();
                vec![LangSpec::exact(&items)]
            }
            Op::In(SetRef::List(l)) => {
                let list = self.prog.lists.get(l.index())?;
                match list.kind {
                    ListKind::Strings => {
                        let items: Vec<&str> = list.items.iter().map(String::as_str).collect();
                        vec![LangSpec::exact(&items)]
                    }
                    ListKind::Domains => vec![LangSpec::domains(&list.items, false)],
                    ListKind::Cidr => return None,
                }
            }
            Op::IsNull => vec![LangSpec::exact(&[""])],
            _ => return None,
        })
    }

    fn str_test(&mut self, run: u32, term: &Term, op: &Op, id: ExprId) -> B {
        match op {
            Op::In(SetRef::Table(t)) => return self.table_in(run, t.0, &V::Str(term.clone()), id),
            Op::In(SetRef::Nets(nets)) => {
                return match self.ip_of_term(term) {
                    Some(ip) => self.ip_in(&ip, &super::sets::IpSet::of_cidrs(nets)),
                    None => self.opaque(run, format!("nets:{}:{term:?}", id.0)),
                }
            }
            Op::In(SetRef::List(l)) if self.prog.lists.get(l.index()).is_some_and(|x| x.kind == ListKind::Cidr) => {
                let nets = self.prog.lists[l.index()].nets.clone();
                return match self.ip_of_term(term) {
                    Some(ip) => self.ip_in(&ip, &super::sets::IpSet::of_cidrs(&nets)),
                    None => self.opaque(run, format!("nets:{}:{term:?}", id.0)),
                };
            }
            Op::Cmp(c, rhs) => {
                if let Some(s) = term.as_lit() {
                    let n: f64 = s.trim().parse().unwrap_or(0.0);
                    return B::Const(cmp(n, *c, *rhs));
                }
                if let [Part::Sym(s, View::Whole)] = term.0.as_slice() {
                    if matches!(self.w.syms[*s as usize].kind, SymKind::Num(_)) {
                        return self.num_test(&NumV::Sym(*s), *c, *rhs);
                    }
                }
                return self.opaque(run, format!("cmp:{}:{term:?}", id.0));
            }
            _ => {}
        }
        match self.op_spec(op) {
            Some(specs) => B::or(specs.iter().map(|s| self.string_test(run, term, s)).collect()),
            None => self.opaque(run, format!("test:{}:{term:?}", id.0)),
        }
    }

    fn ip_of_term(&self, term: &Term) -> Option<IpV> {
        if let Some(s) = term.as_lit() {
            return s.trim().parse().ok().map(IpV::Const);
        }
        match term.0.as_slice() {
            [Part::Sym(s, View::Whole)] if matches!(self.w.syms[*s as usize].kind, SymKind::Ip(_)) => {
                Some(IpV::Sym(*s))
            }
            _ => None,
        }
    }

    /// Is `prefix · view(x) · suffix` (or the literal text) in the language?
    pub fn string_test(&mut self, run: u32, term: &Term, spec: &LangSpec) -> B {
        if let Some(s) = term.as_lit() {
            return match self.w.dfa(spec).map(|d| d.matches(s.as_bytes())) {
                Ok(auto::Acc::Yes) => B::Const(true),
                Ok(auto::Acc::No) => B::Const(false),
                _ => self.opaque(run, format!("lit:{s}:{}", spec.pattern)),
            };
        }
        if let Some((pre, sym, view, suf)) = term.single() {
            if matches!(self.w.syms[sym as usize].kind, SymKind::Str(_)) && spec.view == View::Whole {
                let mut s = spec.clone();
                let mut prefix = pre;
                prefix.extend_from_slice(&spec.prefix);
                let mut suffix = spec.suffix.clone();
                suffix.extend_from_slice(&suf);
                s.prefix = prefix;
                s.suffix = suffix;
                s.view = view;
                return B::atom(self.w.atom(sym, AtomKind::Lang(s)));
            }
        }
        self.opaque(run, format!("str:{term:?}:{}", spec.pattern))
    }

    fn list_test(&mut self, run: u32, l: &ListV, spec: &LangSpec) -> B {
        match l {
            ListV::Sym(s) => B::atom(self.w.atom(*s, AtomKind::ListAny(spec.clone()))),
            ListV::Lits(v) => {
                let terms: Vec<Term> = v.iter().map(|x| Term::lit(x)).collect();
                B::or(terms.iter().map(|t| self.string_test(run, t, spec)).collect())
            }
            ListV::Recipients { member, others } => {
                let m = self.string_test(run, member, spec);
                let o = B::atom(self.w.atom(*others, AtomKind::ListAny(spec.clone())));
                B::or(vec![m, o])
            }
        }
    }

    fn list_op(&mut self, run: u32, l: &ListV, op: &Op, id: ExprId) -> B {
        match op {
            Op::IsNull => match l {
                ListV::Sym(s) => B::atom(self.w.atom(*s, AtomKind::ListEmpty)),
                ListV::Lits(v) => B::Const(v.is_empty()),
                ListV::Recipients { .. } => B::Const(false),
            },
            Op::In(SetRef::Table(t)) => match l {
                ListV::Lits(v) => {
                    let alts: Vec<B> = v.iter().map(|x| self.table_in(run, t.0, &V::Str(Term::lit(x)), id)).collect();
                    B::or(alts)
                }
                ListV::Recipients { member, .. } => {
                    let m = self.table_in(run, t.0, &V::Str(member.clone()), id);
                    let o = self.opaque(run, format!("list-in-table:{}:{l:?}", t.0));
                    B::or(vec![m, o])
                }
                ListV::Sym(_) => self.opaque(run, format!("list-in-table:{}:{l:?}", t.0)),
            },
            Op::Cmp(c, rhs) => B::Const(cmp(0.0, *c, *rhs)),
            _ => match self.op_spec(op) {
                Some(specs) => B::or(specs.iter().map(|s| self.list_test(run, l, s)).collect()),
                None => self.opaque(run, format!("list:{}:{l:?}", id.0)),
            },
        }
    }

    fn ip_in(&mut self, ip: &IpV, set: &super::sets::IpSet) -> B {
        match ip {
            IpV::Const(a) => B::Const(set.contains(*a)),
            IpV::Sym(s) => B::atom(self.w.atom(*s, AtomKind::Ip(set.clone()))),
        }
    }

    fn ip_test(&mut self, run: u32, ip: &IpV, op: &Op, id: ExprId) -> B {
        use super::sets::IpSet;
        match op {
            Op::In(SetRef::Nets(n)) => self.ip_in(ip, &IpSet::of_cidrs(n)),
            Op::In(SetRef::List(l)) => {
                let Some(list) = self.prog.lists.get(l.index()).cloned() else { return B::Const(false) };
                match list.kind {
                    ListKind::Cidr => self.ip_in(ip, &IpSet::of_cidrs(&list.nets)),
                    _ => {
                        // The address as text against strings: the items that are addresses.
                        let set = list
                            .items
                            .iter()
                            .filter_map(|i| i.parse::<std::net::IpAddr>().ok().filter(|a| a.to_string() == *i))
                            .fold(IpSet::empty(), |a, x| a.union(&IpSet::single(x)));
                        if list.kind == ListKind::Strings {
                            self.ip_in(ip, &set)
                        } else {
                            B::Const(false)
                        }
                    }
                }
            }
            Op::In(SetRef::Strings(items)) => {
                let set = items
                    .iter()
                    .filter_map(|i| {
                        let s = self.prog.str(*i);
                        s.parse::<std::net::IpAddr>().ok().filter(|a| a.to_string().eq_ignore_ascii_case(s))
                    })
                    .fold(IpSet::empty(), |a, x| a.union(&IpSet::single(x)));
                self.ip_in(ip, &set)
            }
            Op::In(SetRef::Table(t)) => self.table_in(run, t.0, &V::Ip(ip.clone()), id),
            Op::IsNull => B::Const(false),
            Op::Cmp(c, rhs) => B::Const(cmp(0.0, *c, *rhs)),
            _ => match ip {
                IpV::Const(a) => self.str_test(run, &Term::lit(&a.to_string()), op, id),
                IpV::Sym(_) => self.opaque(run, format!("ip-text:{}", id.0)),
            },
        }
    }

    fn num_test(&mut self, n: &NumV, c: CmpOp, rhs: f64) -> B {
        use super::sets::NumSet;
        match n {
            NumV::Const(x) => B::Const(cmp(*x as f64, c, rhs)),
            NumV::Sym(s) => {
                let fl = rhs.floor() as i64;
                let ce = rhs.ceil() as i64;
                let exact = rhs.fract() == 0.0;
                let set = match c {
                    CmpOp::Eq if exact => NumSet::range(fl, fl),
                    CmpOp::Eq => NumSet::empty(),
                    CmpOp::Ne if exact => NumSet::range(fl, fl).complement(),
                    CmpOp::Ne => NumSet::full(),
                    CmpOp::Lt => NumSet::range(i64::MIN, if exact { fl - 1 } else { fl }),
                    CmpOp::Le => NumSet::range(i64::MIN, fl),
                    CmpOp::Gt => NumSet::range(if exact { fl + 1 } else { ce }, i64::MAX),
                    CmpOp::Ge => NumSet::range(ce, i64::MAX),
                };
                B::atom(self.w.atom(*s, AtomKind::Num(set)))
            }
        }
    }

    // ---- tables ---------------------------------------------------------------------------

    fn is_fingerprint(&self, v: &V) -> bool {
        matches!(v, V::Str(t) if matches!(t.0.as_slice(), [Part::Sym(s, View::Whole)] if *s == self.session.fingerprint))
    }

    /// `VALUE in TABLE`.
    fn table_in(&mut self, run: u32, t: u32, v: &V, id: ExprId) -> B {
        if self.is_fingerprint(v) {
            // A certificate's SHA-256 fingerprint is no one's to choose.
            return B::Const(false);
        }
        let known = self.tables.get(t as usize).cloned().flatten();
        match (known, v) {
            (Some(Known::Keys(keys)), V::Str(term)) => {
                let ks: Vec<&str> = keys.iter().map(|(k, _)| k.as_str()).collect();
                let spec = LangSpec::exact(&ks);
                if ks.is_empty() {
                    return B::Const(false);
                }
                self.string_test(run, term, &spec)
            }
            (Some(Known::Keys(keys)), V::Ip(ip)) => {
                let set = keys
                    .iter()
                    .filter_map(|(k, _)| k.parse::<std::net::IpAddr>().ok().filter(|a| a.to_string() == *k))
                    .fold(super::sets::IpSet::empty(), |a, x| a.union(&super::sets::IpSet::single(x)));
                self.ip_in(ip, &set)
            }
            (Some(Known::Cidr(rows)), V::Ip(ip)) => {
                let set = super::sets::IpSet::of_cidrs(rows.iter().map(|(c, _)| c));
                self.ip_in(ip, &set)
            }
            (Some(Known::Patterns(rows)), V::Str(term)) => {
                let mut alts = Vec::new();
                for (pat, ci, _) in &rows {
                    let spec = LangSpec {
                        pattern: pat.clone(),
                        syntax: auto::Syntax::Table { case_insensitive: *ci },
                        view: View::Whole,
                        prefix: Vec::new(),
                        suffix: Vec::new(),
                        fast: None,
                    };
                    alts.push(self.string_test(run, term, &spec));
                }
                B::or(alts)
            }
            (Some(Known::Keys(_)) | Some(Known::Patterns(_)), V::List(l)) => {
                let l = l.clone();
                self.list_op(run, &l, &Op::In(SetRef::Table(TableId(t))), id)
            }
            _ => {
                let term = match v {
                    V::Str(term) => match term.as_lit() {
                        Some(k) => Term::lit(&k.to_ascii_lowercase()),
                        None => term.clone(),
                    },
                    V::Ip(IpV::Sym(s)) => Term::sym(*s, View::Whole),
                    V::Ip(IpV::Const(a)) => Term::lit(&a.to_string()),
                    other => {
                        let s = self.bool_sym(Origin::TableHas { table: t, key: format!("{other:?}") }, false);
                        return self.truth(s);
                    }
                };
                let s = self.bool_sym(Origin::TableHas { table: t, key: format!("{term:?}") }, false);
                self.mean(s, Meaning::TableHas { table: t, key: term });
                self.truth(s)
            }
        }
    }

    /// A test on the value a table gives `key`.
    fn lookup_test(&mut self, run: u32, t: u32, key: &Term, op: &Op, id: ExprId) -> B {
        let known = self.tables.get(t as usize).cloned().flatten();
        match known {
            Some(Known::Keys(rows)) => {
                let mut values: Vec<String> = rows.iter().map(|(_, v)| v.clone()).collect();
                values.push(String::new());
                values.sort();
                values.dedup();
                let mut truth = std::collections::HashMap::new();
                for v in &values {
                    match self.test(run, &V::Str(Term::lit(v)), op, id) {
                        B::Const(b) => {
                            truth.insert(v.clone(), b);
                        }
                        _ => return self.unknown_lookup_test(run, t, key, op, id),
                    }
                }
                let empty = truth.get("").copied().unwrap_or(false);
                let pick: Vec<&str> = rows
                    .iter()
                    .filter(|(_, v)| truth.get(v).copied().unwrap_or(false) != empty)
                    .map(|(k, _)| k.as_str())
                    .collect();
                if pick.is_empty() {
                    return B::Const(empty);
                }
                let inset = match self.ip_of_term(key) {
                    Some(ip) => {
                        let set = pick
                            .iter()
                            .filter_map(|k| k.parse::<std::net::IpAddr>().ok().filter(|a| a.to_string() == *k))
                            .fold(super::sets::IpSet::empty(), |a, x| a.union(&super::sets::IpSet::single(x)));
                        self.ip_in(&ip, &set)
                    }
                    None => {
                        let spec = LangSpec::exact(&pick);
                        self.string_test(run, key, &spec)
                    }
                };
                if empty {
                    inset.not()
                } else {
                    inset
                }
            }
            Some(Known::Cidr(rows)) if self.ip_of_term(key).is_some() => {
                let ip = self.ip_of_term(key).expect("checked");
                let mut covered = super::sets::IpSet::empty();
                let mut yes = super::sets::IpSet::empty();
                for (c, v) in &rows {
                    let r = match self.test(run, &V::Str(Term::lit(v)), op, id) {
                        B::Const(b) => b,
                        _ => return self.unknown_lookup_test(run, t, key, op, id),
                    };
                    let here = super::sets::IpSet::of_cidr(c).minus(&covered);
                    if r {
                        yes = yes.union(&here);
                    }
                    covered = covered.union(&here);
                }
                let empty = match self.test(run, &V::Str(Term::default()), op, id) {
                    B::Const(b) => b,
                    _ => return self.unknown_lookup_test(run, t, key, op, id),
                };
                if empty {
                    yes = yes.union(&covered.complement());
                }
                self.ip_in(&ip, &yes)
            }
            Some(Known::Patterns(rows)) if rows.iter().all(|(_, _, v)| !v.contains('$')) => {
                let mut alts = Vec::new();
                let mut earlier: Vec<B> = Vec::new();
                for (pat, ci, v) in &rows {
                    let r = match self.test(run, &V::Str(Term::lit(v)), op, id) {
                        B::Const(b) => b,
                        _ => return self.unknown_lookup_test(run, t, key, op, id),
                    };
                    let spec = LangSpec {
                        pattern: pat.clone(),
                        syntax: auto::Syntax::Table { case_insensitive: *ci },
                        view: View::Whole,
                        prefix: Vec::new(),
                        suffix: Vec::new(),
                        fast: None,
                    };
                    let m = self.string_test(run, key, &spec);
                    if r {
                        let mut c: Vec<B> = earlier.iter().map(|b| b.clone().not()).collect();
                        c.push(m.clone());
                        alts.push(B::and(c));
                    }
                    earlier.push(m);
                }
                let empty = match self.test(run, &V::Str(Term::default()), op, id) {
                    B::Const(b) => b,
                    _ => return self.unknown_lookup_test(run, t, key, op, id),
                };
                if empty {
                    alts.push(B::and(earlier.into_iter().map(B::not).collect()));
                }
                B::or(alts)
            }
            _ => self.unknown_lookup_test(run, t, key, op, id),
        }
    }

    fn unknown_lookup_test(&mut self, run: u32, t: u32, key: &Term, op: &Op, id: ExprId) -> B {
        if self.is_fingerprint(&V::Str(key.clone())) {
            return self.test(run, &V::Str(Term::default()), op, id);
        }
        let s = self.table_value_sym(t, key);
        self.test(run, &V::Str(Term::sym(s, View::Whole)), op, id)
    }

    // ---- actions ------------------------------------------------------------------------

    fn act(&mut self, stage: Stage, env: &Env, p: Path, a: &Action, loc: LocId) -> Vec<(Path, Option<End>)> {
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

    /// `access TABLE`: every result the table can give this client, with its condition.
    fn access(
        &mut self,
        stage: Stage,
        env: &Env,
        p: Path,
        t: u32,
        delay: AccessDelay,
        loc: LocId,
    ) -> Vec<(Path, Option<End>)> {
        #[derive(Clone, Copy, PartialEq)]
        enum R {
            Ok,
            Relay(bool),
            Refuse,
            Discard,
            Hold,
            Continue,
        }
        let scope = match stage {
            Stage::Connect | Stage::Helo | Stage::Auth => acc::Scope::Connect,
            Stage::Mail => acc::Scope::From,
            _ => acc::Scope::To,
        };
        let subject: Term = match scope {
            acc::Scope::Connect => Term::default(),
            acc::Scope::From => env.sender.map(|s| Term::sym(s, View::Whole)).unwrap_or_default(),
            acc::Scope::To => env.rcpt.as_ref().map(|r| r.addr.clone()).unwrap_or_default(),
        };
        let classify = |key: &str, v: &str| -> R {
            let v = v.trim();
            let v = v.strip_prefix('"').and_then(|x| x.strip_suffix('"')).unwrap_or(v);
            let word = v.split_whitespace().next().unwrap_or("").to_ascii_uppercase();
            if v.eq_ignore_ascii_case("REJECT") {
                return R::Refuse;
            }
            match acc::parse_value(v) {
                AccessAction::Accept if word == "RELAY" => match scope {
                    acc::Scope::To => R::Relay(relay_key_is_declaration(key)),
                    _ => R::Relay(true),
                },
                AccessAction::Accept => R::Ok,
                AccessAction::Dunno => R::Continue,
                AccessAction::Discard => R::Discard,
                AccessAction::Reject { .. } | AccessAction::Tempfail { .. } | AccessAction::Invalid(_) => R::Refuse,
                AccessAction::Hold(_) => R::Hold,
                // FRIEND and HATER only decide whether a delayed refusal reaches this
                // recipient: the stage goes on, as the runtime's does.
                AccessAction::Warn(_) | AccessAction::Friend | AccessAction::Hater => R::Continue,
            }
        };
        // `:delay` (sendmail's delay_checks): a refusal at connect, helo or mail waits for the
        // recipients, which it may or may not reach (FRIEND, HATER). A refusal only ever
        // takes relaying away, so the proof lets the stage go on as if there were no entry
        // and never counts the delayed refusal at rcpt: every result the runtime can give
        // is one considered here.
        let delayed = delay != AccessDelay::Now && scope != acc::Scope::To;
        let classify = |key: &str, v: &str| -> R {
            match classify(key, v) {
                R::Refuse if delayed => R::Continue,
                r => r,
            }
        };
        let mut alts: Vec<(B, R)> = Vec::new();
        match self.tables.get(t as usize).cloned().flatten() {
            Some(Known::Keys(rows)) => {
                let mut all = Vec::new();
                for (k, v) in &rows {
                    let bare = match strip_scope(k, scope) {
                        Some(b) => b,
                        None => continue,
                    };
                    let cond = match scope {
                        acc::Scope::Connect => self.client_key_cond(env.run, bare),
                        _ => self.address_key_cond(env.run, &subject, bare),
                    };
                    if cond == B::Const(false) {
                        continue;
                    }
                    all.push(cond.clone());
                    let r = classify(bare, v);
                    alts.push((cond, r));
                }
                alts.push((B::and(all.into_iter().map(B::not).collect()), R::Continue));
            }
            _ => {
                // Unknown contents: any result, for a key the attacker's value can have.
                let what = format!("access:{t}:{}:{subject:?}", stage.name());
                let s = self.num_sym(Origin::World { what, run: env.run }, 0, 5);
                self.mean(s, Meaning::Access { table: t, stage, subject: subject.clone() });
                let results = [R::Continue, R::Ok, R::Relay(false), R::Refuse, R::Discard, R::Hold];
                for (i, r) in results.iter().enumerate() {
                    // A delayed refusal continues, which `no entry` (0) already covers for
                    // every key this unknown table may hold.
                    if delayed && *r == R::Refuse {
                        continue;
                    }
                    let b = self.num_test(&NumV::Sym(s), CmpOp::Eq, i as f64);
                    alts.push((b, *r));
                }
            }
        }
        // Group by result.
        let mut out = Vec::new();
        let kinds = [R::Continue, R::Ok, R::Relay(true), R::Relay(false), R::Refuse, R::Discard, R::Hold];
        for k in kinds {
            let conds: Vec<B> = alts.iter().filter(|(_, r)| *r == k).map(|(b, _)| b.clone()).collect();
            if conds.is_empty() {
                continue;
            }
            let b = B::or(conds);
            if b == B::Const(false) {
                continue;
            }
            let mut q = p.clone();
            q.cons = b.assume(&q.cons);
            let (what, end) = match (k, scope) {
                (R::Continue, _) => ("access: no entry", None),
                (R::Hold, _) => {
                    q.held = true;
                    ("access: HOLD", None)
                }
                (R::Ok, acc::Scope::To) => ("access: OK", Some(End::Default)),
                (R::Ok, _) => ("access: OK", Some(End::Accept)),
                (R::Relay(legit), acc::Scope::To) => ("access: RELAY", Some(End::AcceptRelay { legit })),
                (R::Relay(_), acc::Scope::Connect) => {
                    q.grant = true;
                    ("access: RELAY", Some(End::Accept))
                }
                (R::Relay(_), _) => ("access: RELAY (as OK)", Some(End::Accept)),
                (R::Refuse, _) => ("access: refuse", Some(End::Refuse)),
                (R::Discard, _) => ("access: DISCARD", Some(End::Discard)),
            };
            q.trace = q.trace.with(loc, what.into());
            out.push((q, end));
        }
        out
    }

    /// The condition under which an access key matches the client (address or its
    /// network, or its name and parent domains).
    fn client_key_cond(&mut self, run: u32, key: &str) -> B {
        if let Some(set) = access_ip_key(key) {
            return self.ip_in(&IpV::Sym(self.session.client_ip), &set);
        }
        let name = Term::sym(self.session.client_name, View::Whole);
        let spec = LangSpec::domains(&[key.to_string(), format!(".{key}")], false);
        let m = self.string_test(run, &name, &spec);
        let unknown = LangSpec::exact(&["unknown"]);
        let u = self.string_test(run, &name, &unknown);
        B::and(vec![m, u.not()])
    }

    /// The condition under which an access key matches an address (`From:`/`To:` keys).
    fn address_key_cond(&mut self, run: u32, addr: &Term, key: &str) -> B {
        if key == "<>" {
            return self.string_test(run, addr, &LangSpec::exact(&[""]));
        }
        if let Some(user) = key.strip_suffix('@') {
            let l = self.term_view(run, addr, View::Local);
            let has_at = self.string_test(run, addr, &LangSpec::contains(&["@"]));
            let m = self.string_test(run, &l, &LangSpec::exact(&[user]));
            return B::and(vec![has_at, m]);
        }
        if key.contains('@') {
            return self.string_test(run, addr, &LangSpec::exact(&[key]));
        }
        let d = self.term_view(run, addr, View::Domain);
        let spec = LangSpec::domains(&[key.to_string(), format!(".{key}")], false);
        self.string_test(run, &d, &spec)
    }
}

/// An access key without its scope, if it applies in `scope` (unscoped keys apply in all).
fn strip_scope(key: &str, scope: acc::Scope) -> Option<&str> {
    for s in [acc::Scope::Connect, acc::Scope::From, acc::Scope::To] {
        let pre = s.prefix().to_ascii_lowercase();
        if let Some(rest) = key.strip_prefix(&pre) {
            return if s == scope { Some(rest) } else { None };
        }
    }
    Some(key)
}

/// A `To:` key with RELAY that declares a destination the administrator relays for (a
/// domain that is not a public suffix, or one address), rather than letting `user@` any
/// domain through.
fn relay_key_is_declaration(key: &str) -> bool {
    if key.ends_with('@') || key.is_empty() || key == "<>" {
        return false;
    }
    let domain = key.rsplit_once('@').map(|(_, d)| d).unwrap_or(key);
    !super::public_suffix(domain)
}

/// `192.0.2`, `10`, `2001:db8` (16-bit groups): the network an access key names.
pub fn access_ip_key(key: &str) -> Option<super::sets::IpSet> {
    use super::sets::IpSet;
    let parts: Vec<&str> = key.split('.').collect();
    if (1..=4).contains(&parts.len())
        && parts.iter().all(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()))
    {
        let mut octets = [0u8; 4];
        for (i, p) in parts.iter().enumerate() {
            octets[i] = p.parse().ok()?;
        }
        return Some(IpSet::of_cidr(&Cidr { addr: std::net::IpAddr::from(octets), prefix: (parts.len() * 8) as u8 }));
    }
    if key.contains(':') {
        if let Ok(a) = key.parse::<std::net::Ipv6Addr>() {
            return Some(IpSet::single(std::net::IpAddr::V6(a)));
        }
        let groups: Vec<&str> = key.split(':').collect();
        if groups.len() < 8
            && groups.iter().all(|g| !g.is_empty() && g.len() <= 4 && g.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            let mut segs = [0u16; 8];
            for (i, g) in groups.iter().enumerate() {
                segs[i] = u16::from_str_radix(g, 16).ok()?;
            }
            let addr = std::net::Ipv6Addr::from(segs);
            return Some(IpSet::of_cidr(&Cidr { addr: std::net::IpAddr::V6(addr), prefix: (groups.len() * 16) as u8 }));
        }
    }
    None
}

fn cmp(n: f64, c: CmpOp, rhs: f64) -> bool {
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
