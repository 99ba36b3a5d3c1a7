//! Symbols, atoms and path constraints of the open-relay proof.
//!
//! A **symbol** is one unknown the attacker (or the world) chooses: the HELO name of one
//! HELO command, the sender of one MAIL, the client address, the value a table returns
//! for one key, whether one DNS query answers. An **atom** is a test on one symbol (the
//! string is in a regular language, the address in a set, the number in a range, the
//! yes/no symbol is true). A path's **constraint** is a conjunction of atoms and their
//! negations, kept as a persistent list so that forking a path costs nothing; joining two
//! paths keeps their common prefix and adds one disjunction of what differs.
//!
//! Satisfiability is decided per symbol, exactly (product automata for strings, interval
//! arithmetic for addresses and numbers): symbols are independent except through a
//! disjunction made by a join, which is projected onto each symbol (an
//! over-approximation, never an under-approximation).

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::rc::Rc;

use super::auto::{self, Acc, Dfa, Form, Found, Syntax};
use super::sets::{IpSet, NumSet};

pub type SymId = u32;
pub type AtomId = u32;

/// How a string test reads the symbol's value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum View {
    Whole,
    /// After the last `@`, lower-cased.
    Domain,
    /// Before the last `@`.
    Local,
    /// The local part's `+detail`.
    Detail,
}

/// A regular language, as a pattern and the way the symbol is read.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct LangSpec {
    pub pattern: String,
    pub syntax: Syntax,
    pub view: View,
    pub prefix: Vec<u8>,
    pub suffix: Vec<u8>,
    /// The same language as a list of literals, to test a text without an automaton.
    pub fast: Option<Fast>,
}

/// Literal languages (ASCII case ignored, as the runtime compares).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Fast {
    Exact(Vec<String>),
    Contains(Vec<String>),
    /// A domains list (`address::domain_matches`), and whether the empty text is in it.
    Domains(Vec<String>, bool),
}

impl Fast {
    fn test(&self, x: &[u8]) -> bool {
        match self {
            Fast::Exact(v) => v.iter().any(|i| i.as_bytes().eq_ignore_ascii_case(x)),
            Fast::Contains(v) => {
                let lx = x.to_ascii_lowercase();
                v.iter().any(|i| {
                    let li = i.as_bytes().to_ascii_lowercase();
                    li.is_empty() || lx.windows(li.len()).any(|w| w == li.as_slice())
                })
            }
            Fast::Domains(v, empty) => {
                if x.is_empty() {
                    return *empty;
                }
                let d = String::from_utf8_lossy(x);
                v.iter().any(|p| crate::address::domain_matches(p, &d))
            }
        }
    }
}

impl LangSpec {
    pub fn bytes(pattern: String, view: View) -> LangSpec {
        LangSpec { pattern, syntax: Syntax::Bytes, view, prefix: Vec::new(), suffix: Vec::new(), fast: None }
    }
    pub fn exact(items: &[&str]) -> LangSpec {
        let mut l = LangSpec::bytes(auto::exact(items), View::Whole);
        l.fast = Some(Fast::Exact(items.iter().map(|s| s.to_string()).collect()));
        l
    }
    pub fn contains(items: &[&str]) -> LangSpec {
        let mut l = LangSpec::bytes(auto::contains(items), View::Whole);
        l.fast = Some(Fast::Contains(items.iter().map(|s| s.to_string()).collect()));
        l
    }
    pub fn domains(items: &[String], empty: bool) -> LangSpec {
        let p = auto::domain_list(items);
        let p = if empty { format!("(?:\\A\\z)|(?:{p})") } else { p };
        let mut l = LangSpec::bytes(p, View::Whole);
        l.fast = Some(Fast::Domains(items.to_vec(), empty));
        l
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum AtomKind {
    /// The string symbol is in the language.
    Lang(LangSpec),
    /// Some element of the list symbol is in the language.
    ListAny(LangSpec),
    /// The list symbol is empty.
    ListEmpty,
    Ip(IpSet),
    Num(NumSet),
    /// The yes/no symbol is true.
    True,
}

#[derive(Clone, Debug)]
pub enum SymKind {
    /// A string, whose possible values are the language (None: any string).
    Str(Option<LangSpec>),
    List(Option<LangSpec>),
    Ip(IpSet),
    Num(NumSet),
    Bool,
}

/// What a symbol stands for (for the counterexample, and to tell the attacker's data from
/// the administrator's).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Origin {
    ClientIp,
    ClientPort,
    ClientName,
    ClientPtr,
    LocalIp,
    SessionId,
    Tls,
    TlsVersion,
    TlsCipher,
    ClientCert,
    Fingerprint,
    /// A per-command fact of run `run`: "helo.name", "sender", "recipient", "time.hour" ...
    Fact {
        run: u32,
        fact: &'static str,
    },
    /// A header's values, the body, attachment names/types in the data run.
    Header(String),
    /// The value table `table` has for the key (a term of other symbols, rendered).
    TableValue {
        table: u32,
        key: String,
    },
    /// Whether `table` holds the key.
    TableHas {
        table: u32,
        key: String,
    },
    /// A DNS question and whether its answer is yes ("dnsbl:zone", "rhsbl:zone:dom", "resolvable:dom").
    Dns {
        query: String,
        run: u32,
    },
    /// Counters, greylisting, call-ahead, scores, SPF and friends, per run.
    World {
        what: String,
        run: u32,
    },
    /// A copy of a symbol made for a value kept from an earlier command.
    Copy {
        of: SymId,
        serial: u32,
    },
}

#[derive(Clone, Debug)]
pub struct Sym {
    pub kind: SymKind,
    pub origin: Origin,
    /// The attacker chooses it (a client value), rather than the administrator or the server.
    pub attacker: bool,
}

/// A literal of a constraint.
#[derive(Clone, Debug)]
pub enum Lit {
    Atom(AtomId, bool),
    /// One of the branches holds (made by joining paths).
    Or(Vec<Conj>),
}

/// A conjunction, as a persistent list (newest first).
#[derive(Clone, Debug, Default)]
pub struct Conj(Option<Rc<Node>>);

#[derive(Debug)]
pub struct Node {
    lit: Lit,
    next: Conj,
    len: usize,
}

impl Drop for Node {
    // Long constraints are long lists: drop them in a loop, not by recursion.
    fn drop(&mut self) {
        let mut next = self.next.0.take();
        while let Some(n) = next {
            match Rc::try_unwrap(n) {
                Ok(mut node) => next = node.next.0.take(),
                Err(_) => break,
            }
        }
    }
}

impl Conj {
    pub fn top() -> Conj {
        Conj(None)
    }
    pub fn len(&self) -> usize {
        self.0.as_ref().map(|n| n.len).unwrap_or(0)
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_none()
    }
    pub fn with(&self, lit: Lit) -> Conj {
        Conj(Some(Rc::new(Node { lit, next: self.clone(), len: self.len() + 1 })))
    }
    pub fn iter(&self) -> impl Iterator<Item = &Lit> {
        let mut cur = self.0.as_deref();
        std::iter::from_fn(move || {
            let n = cur?;
            cur = n.next.0.as_deref();
            Some(&n.lit)
        })
    }
    fn ptr_eq(a: &Conj, b: &Conj) -> bool {
        match (&a.0, &b.0) {
            (None, None) => true,
            (Some(x), Some(y)) => Rc::ptr_eq(x, y),
            _ => false,
        }
    }
    /// The literals before the common tail of `a` and `b`, and that tail.
    fn split_common(a: &Conj, b: &Conj) -> (Vec<Lit>, Vec<Lit>, Conj) {
        let (mut x, mut y) = (a.clone(), b.clone());
        let mut ra = Vec::new();
        let mut rb = Vec::new();
        while x.len() > y.len() {
            let n = x.0.clone().expect("longer list has a node");
            ra.push(n.lit.clone());
            x = n.next.clone();
        }
        while y.len() > x.len() {
            let n = y.0.clone().expect("longer list has a node");
            rb.push(n.lit.clone());
            y = n.next.clone();
        }
        while !Conj::ptr_eq(&x, &y) {
            let (nx, ny) = (x.0.clone().expect("same length"), y.0.clone().expect("same length"));
            ra.push(nx.lit.clone());
            rb.push(ny.lit.clone());
            x = nx.next.clone();
            y = ny.next.clone();
        }
        (ra, rb, x)
    }
    /// A constraint implied by each of `a` and `b` (their join).
    pub fn hull(a: &Conj, b: &Conj) -> Conj {
        let (ra, rb, tail) = Conj::split_common(a, b);
        if ra.is_empty() || rb.is_empty() {
            return tail;
        }
        if let ([Lit::Atom(x, p)], [Lit::Atom(y, q)]) = (ra.as_slice(), rb.as_slice()) {
            if x == y && p != q {
                return tail;
            }
        }
        let mk = |v: Vec<Lit>| v.into_iter().rev().fold(Conj::top(), |c, l| c.with(l));
        tail.with(Lit::Or(vec![mk(ra), mk(rb)]))
    }
}

/// Every symbol and atom of one proof.
#[derive(Default)]
pub struct World {
    pub syms: Vec<Sym>,
    sym_index: HashMap<Origin, SymId>,
    pub atoms: Vec<(SymId, AtomKind)>,
    atom_index: HashMap<(SymId, AtomKind), AtomId>,
    dfas: HashMap<(LangSpec, bool), Result<Rc<Dfa>, String>>,
    serial: u32,
    /// Cached per-symbol answers, keyed by the symbol's formula.
    cache: HashMap<(SymId, Form, Vec<AtomId>), Decided>,
    /// Compiled tests for checking a text (see `member`).
    regexes: HashMap<LangSpec, Result<regex_automata::meta::Regex, String>>,
    /// The policy's own compiled patterns, by source (what the runtime matches with).
    pub policy_regexes: HashMap<String, regex::Regex>,
    /// The client's forward-confirmed name: never under a domain its tests name.
    pub fresh_name: Option<SymId>,
    /// The client certificate's fingerprint: never one its tests name.
    pub fresh_fingerprint: Option<SymId>,
}

/// The answer for one symbol.
#[derive(Clone, Debug, PartialEq)]
pub enum Decided {
    Sat(Value),
    Unsat,
    Unknown(String),
}

/// A value of a symbol in a model.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Str(String),
    List(Vec<String>),
    Ip(IpAddr),
    Num(i64),
    Bool(bool),
}

/// Values for the symbols a constraint mentions; the rest take their defaults.
#[derive(Clone, Debug, Default)]
pub struct Model {
    pub values: BTreeMap<SymId, Value>,
    /// Some value was taken from an undecided automaton state.
    pub unsure: bool,
}

const SEARCH_LIMIT: usize = 200_000;
/// Disjunctions split per constraint before the rest is projected.
const SPLIT_BUDGET: usize = 4096;

impl World {
    pub fn sym(&mut self, origin: Origin, kind: SymKind, attacker: bool) -> SymId {
        if let Some(id) = self.sym_index.get(&origin) {
            return *id;
        }
        let id = self.syms.len() as SymId;
        self.syms.push(Sym { kind, origin: origin.clone(), attacker });
        self.sym_index.insert(origin, id);
        id
    }
    pub fn find(&self, origin: &Origin) -> Option<SymId> {
        self.sym_index.get(origin).copied()
    }
    /// A fresh symbol like `of` (a value kept from another command).
    pub fn copy_of(&mut self, of: SymId) -> SymId {
        self.serial += 1;
        let s = self.syms[of as usize].clone();
        let origin = Origin::Copy { of, serial: self.serial };
        let id = self.syms.len() as SymId;
        self.syms.push(Sym { kind: s.kind, origin: origin.clone(), attacker: s.attacker });
        self.sym_index.insert(origin, id);
        id
    }
    pub fn atom(&mut self, sym: SymId, kind: AtomKind) -> AtomId {
        let key = (sym, kind);
        if let Some(id) = self.atom_index.get(&key) {
            return *id;
        }
        let id = self.atoms.len() as AtomId;
        self.atoms.push(key.clone());
        self.atom_index.insert(key, id);
        id
    }
    pub fn atom_sym(&self, a: AtomId) -> SymId {
        self.atoms[a as usize].0
    }

    /// The automaton of a language spec (cached); `over` is the list-element reading
    /// (no view applies to list elements).
    pub fn dfa(&mut self, spec: &LangSpec) -> Result<Rc<Dfa>, String> {
        let key = (spec.clone(), false);
        if let Some(d) = self.dfas.get(&key) {
            return d.clone();
        }
        let built = (|| {
            let inner = Dfa::from_regex(&spec.pattern, spec.syntax)?;
            let inner = inner.with_affixes(&spec.prefix, &spec.suffix);
            let d = match spec.view {
                View::Whole => inner,
                View::Domain => inner.domain_view()?,
                View::Local => inner.local_view()?,
                View::Detail => inner.detail_view()?,
            };
            Ok(Rc::new(d))
        })();
        self.dfas.insert(key, built.clone());
        built
    }

    /// Is the atom true of the value? (`None`: the automaton cannot say.)
    pub fn eval_atom(&mut self, a: AtomId, v: &Value) -> Option<bool> {
        let (_, kind) = self.atoms[a as usize].clone();
        match (kind, v) {
            (AtomKind::Lang(spec), Value::Str(s)) => match self.member(&spec, s.as_bytes()) {
                Acc::Yes => Some(true),
                Acc::No => Some(false),
                Acc::Maybe => None,
            },
            (AtomKind::ListAny(spec), Value::List(l)) => {
                let mut any = Some(false);
                for s in l {
                    match self.member(&spec, s.as_bytes()) {
                        Acc::Yes => return Some(true),
                        Acc::Maybe => any = None,
                        Acc::No => {}
                    }
                }
                any
            }
            (AtomKind::ListEmpty, Value::List(l)) => Some(l.is_empty()),
            (AtomKind::Ip(set), Value::Ip(ip)) => Some(set.contains(*ip)),
            (AtomKind::Num(set), Value::Num(n)) => Some(set.contains(*n)),
            (AtomKind::True, Value::Bool(b)) => Some(*b),
            _ => None,
        }
    }

    /// Decide a constraint: a model, or unsatisfiable, or undecided (with why).
    ///
    /// A disjunction whose branches constrain one and the same symbol is decided with that
    /// symbol's automaton; one that spans several symbols is split, branch by branch (up to
    /// a bound, past which it is projected onto each symbol: an over-approximation whose
    /// model is then marked unsure).
    pub fn solve(&mut self, c: &Conj) -> Result<Model, Option<String>> {
        let lits: Vec<Lit> = c.iter().cloned().collect();
        let mut budget = SPLIT_BUDGET;
        self.solve_lits(lits, &mut budget)
    }

    fn single_sym(&self, l: &Lit) -> bool {
        fn syms(w: &World, l: &Lit, out: &mut Vec<SymId>) {
            match l {
                Lit::Atom(a, _) => {
                    let s = w.atom_sym(*a);
                    if !out.contains(&s) {
                        out.push(s);
                    }
                }
                Lit::Or(bs) => bs.iter().for_each(|b| b.iter().for_each(|x| syms(w, x, out))),
            }
        }
        let mut v = Vec::new();
        syms(self, l, &mut v);
        v.len() <= 1
    }

    fn solve_lits(&mut self, lits: Vec<Lit>, budget: &mut usize) -> Result<Model, Option<String>> {
        // Decide what the constraint says of each symbol alone; then check the disjunctions
        // that span symbols against that model, and split only one it violates.
        let (definite, mixed): (Vec<Lit>, Vec<Lit>) =
            lits.iter().cloned().partition(|l| !matches!(l, Lit::Or(_)) || self.single_sym(l));
        let mut model = self.project_solve(&definite, false)?;
        for (i, l) in mixed.iter().enumerate() {
            if self.eval_lit(l, &mut model) == Some(true) {
                continue;
            }
            if *budget == 0 {
                // Out of splits: the rest is taken as satisfiable (over-approximation).
                model.unsure = true;
                return Ok(model);
            }
            let Lit::Or(branches) = l else { continue };
            let mut unknown = None;
            for b in branches {
                if *budget == 0 {
                    break;
                }
                *budget -= 1;
                let mut next = definite.clone();
                next.extend(b.iter().cloned());
                next.extend(mixed.iter().enumerate().filter(|(k, _)| *k != i).map(|(_, x)| x.clone()));
                match self.solve_lits(next, budget) {
                    Ok(m) => return Ok(m),
                    Err(None) => {}
                    Err(Some(w)) => unknown = Some(w),
                }
            }
            if *budget == 0 {
                model.unsure = true;
                return Ok(model);
            }
            return Err(unknown);
        }
        Ok(model)
    }

    /// What the attacker cannot choose of a symbol, given the tests on it: a name under a
    /// domain those tests name (the zone is not its own), a fingerprint they name.
    fn freshness(&mut self, sym: SymId, fs: &mut Vec<Form>, ids: &mut Vec<AtomId>) {
        let specs: Vec<LangSpec> = ids
            .iter()
            .filter_map(|a| match &self.atoms[*a as usize].1 {
                AtomKind::Lang(s) => Some(s.clone()),
                _ => None,
            })
            .collect();
        let extra = if Some(sym) == self.fresh_name {
            let mut named: Vec<String> = specs.iter().flat_map(|s| super::registrable_names(&s.pattern)).collect();
            named.sort();
            named.dedup();
            if named.is_empty() || named.len() > 2000 {
                return;
            }
            let mut items = named.clone();
            items.extend(named.iter().map(|d| format!(".{d}")));
            LangSpec::domains(&items, false)
        } else if Some(sym) == self.fresh_fingerprint {
            let mut lits: Vec<String> = Vec::new();
            for s in &specs {
                let text = super::registrable_names(&s.pattern).join(" ");
                let _ = text;
                let unescaped: String = unescape_bytes(&s.pattern);
                for tok in unescaped.split(|c: char| !(c.is_ascii_hexdigit() || c == ':')) {
                    let tok = tok.trim_matches(':');
                    if tok.len() == 95 {
                        lits.push(tok.to_string());
                    }
                }
            }
            if lits.is_empty() {
                return;
            }
            let refs: Vec<&str> = lits.iter().map(String::as_str).collect();
            LangSpec::exact(&refs)
        } else {
            return;
        };
        let a = self.atom(sym, AtomKind::Lang(extra));
        let i = match ids.iter().position(|x| *x == a) {
            Some(i) => i,
            None => {
                ids.push(a);
                ids.len() - 1
            }
        };
        fs.push(Form::Not(Box::new(Form::Atom(i))));
    }

    /// A literal's truth under a model; a symbol the model lacks takes its default (which
    /// the model then records, so the counterexample uses the same value).
    pub fn eval_lit(&mut self, l: &Lit, m: &mut Model) -> Option<bool> {
        match l {
            Lit::Atom(a, pol) => {
                let s = self.atom_sym(*a);
                let v = match m.values.get(&s) {
                    Some(v) => v.clone(),
                    None => {
                        let d = self.default_of(s);
                        m.values.insert(s, d.clone());
                        d
                    }
                };
                self.eval_atom(*a, &v).map(|b| b == *pol)
            }
            Lit::Or(bs) => {
                let mut any_unknown = false;
                for b in bs {
                    let mut all = Some(true);
                    for x in b.iter() {
                        match self.eval_lit(x, m) {
                            Some(true) => {}
                            Some(false) => {
                                all = Some(false);
                                break;
                            }
                            None => all = None,
                        }
                    }
                    match all {
                        Some(true) => return Some(true),
                        None => any_unknown = true,
                        Some(false) => {}
                    }
                }
                if any_unknown {
                    None
                } else {
                    Some(false)
                }
            }
        }
    }

    /// The value a symbol takes when nothing constrains it (what a counterexample sends).
    pub fn default_of(&self, sym: SymId) -> Value {
        let s = &self.syms[sym as usize];
        let fact = match &s.origin {
            Origin::Fact { fact, .. } => *fact,
            Origin::Copy { of, .. } => match &self.syms[*of as usize].origin {
                Origin::Fact { fact, .. } => fact,
                _ => "",
            },
            _ => "",
        };
        match &s.kind {
            SymKind::Str(_) => Value::Str(match (&s.origin, fact) {
                (Origin::ClientName, _) => "unknown".into(),
                (_, "helo.name") => "attacker.test".into(),
                (_, "sender") => "user@attacker.test".into(),
                (_, "recipient") => "victim@relay-target.test".into(),
                (_, "mail.body") => "7BIT".into(),
                (_, "spf" | "dkim" | "dmarc") => "none".into(),
                (_, "dmarc.policy") => "".into(),
                (_, "tls.version") => "TLSv1.3".into(),
                (_, "auth.mechanism") => "PLAIN".into(),
                _ => String::new(),
            }),
            SymKind::List(_) => Value::List(Vec::new()),
            SymKind::Ip(set) => Value::Ip(set.pick().unwrap_or(IpAddr::from([198, 51, 100, 23]))),
            SymKind::Num(set) => {
                let prefer = if matches!(s.origin, Origin::ClientPort) { 40000 } else { 0 };
                Value::Num(if set.contains(prefer) {
                    prefer
                } else {
                    set.r.iter().find(|(_, b)| *b >= 0).map(|(a, _)| (*a).max(0)).or_else(|| set.first()).unwrap_or(0)
                })
            }
            SymKind::Bool => Value::Bool(false),
        }
    }

    fn project_solve(&mut self, lits: &[Lit], unsure: bool) -> Result<Model, Option<String>> {
        let mut forms: BTreeMap<SymId, Vec<Form>> = BTreeMap::new();
        let mut atoms_of = AtomIdx::default();
        for lit in lits {
            for (sym, f) in project_lit(self, lit, &mut atoms_of) {
                forms.entry(sym).or_default().push(f);
            }
        }
        let mut model = Model { unsure, ..Model::default() };
        let mut unknown = None;
        // Symbols with few tests first: a contradiction there ends the work early.
        let mut forms: Vec<(SymId, Vec<Form>)> = forms.into_iter().collect();
        forms.sort_by_key(|(s, _)| atoms_of.v.get(s).map(Vec::len).unwrap_or(0));
        for (sym, mut fs) in forms {
            let mut ids = atoms_of.v.remove(&sym).unwrap_or_default();
            self.freshness(sym, &mut fs, &mut ids);
            let form = simplify(Form::And(fs));
            match self.decide(sym, &form, &ids) {
                Decided::Sat(v) => {
                    model.values.insert(sym, v);
                }
                Decided::Unsat => return Err(None),
                Decided::Unknown(why) => {
                    if unknown.is_none() {
                        unknown = Some(why);
                    }
                }
            }
        }
        match unknown {
            Some(w) => Err(Some(w)),
            None => Ok(model),
        }
    }

    /// Is the constraint satisfiable? (Undecided counts as satisfiable.)
    pub fn possible(&mut self, c: &Conj) -> bool {
        !matches!(self.solve(c), Err(None))
    }

    fn decide(&mut self, sym: SymId, form: &Form, ids: &[AtomId]) -> Decided {
        let key = (sym, form.clone(), ids.to_vec());
        if let Some(d) = self.cache.get(&key) {
            return d.clone();
        }
        let d = self.decide_uncached(sym, form, ids);
        self.cache.insert(key, d.clone());
        d
    }

    fn decide_uncached(&mut self, sym: SymId, form: &Form, ids: &[AtomId]) -> Decided {
        let kind = self.syms[sym as usize].kind.clone();
        match kind {
            SymKind::Bool => {
                for b in [true, false] {
                    let accs: Vec<Acc> = ids.iter().map(|_| if b { Acc::Yes } else { Acc::No }).collect();
                    if form.eval(&accs) != Acc::No {
                        return Decided::Sat(Value::Bool(b));
                    }
                }
                Decided::Unsat
            }
            SymKind::Ip(base) => {
                let sets: Vec<IpSet> = ids
                    .iter()
                    .map(|a| match &self.atoms[*a as usize].1 {
                        AtomKind::Ip(s) => s.clone(),
                        _ => IpSet::empty(),
                    })
                    .collect();
                let s = ip_form(form, &sets, &base).intersect(&base);
                match s.pick() {
                    Some(ip) => Decided::Sat(Value::Ip(ip)),
                    None => Decided::Unsat,
                }
            }
            SymKind::Num(base) => {
                let sets: Vec<NumSet> = ids
                    .iter()
                    .map(|a| match &self.atoms[*a as usize].1 {
                        AtomKind::Num(s) => s.clone(),
                        _ => NumSet::empty(),
                    })
                    .collect();
                let s = num_form(form, &sets, &base).intersect(&base);
                // Prefer small, non-negative values.
                let pick = s.r.iter().find(|(_, b)| *b >= 0).map(|(a, _)| (*a).max(0)).or_else(|| s.first());
                match pick {
                    Some(n) => Decided::Sat(Value::Num(n)),
                    None => Decided::Unsat,
                }
            }
            SymKind::Str(_) if *form == Form::False => Decided::Unsat,
            SymKind::Str(base) => {
                let base_spec = base.clone().unwrap_or_else(|| LangSpec::bytes(String::new(), View::Whole));
                let mut specs = Vec::new();
                for a in ids {
                    let AtomKind::Lang(spec) = self.atoms[*a as usize].1.clone() else {
                        return Decided::Unknown("a string test on a value that is not a string".into());
                    };
                    specs.push(spec);
                }
                // The attacker's usual values first: cheap, and they read well.
                for cand in self.preferred(sym) {
                    if self.member(&base_spec, cand.as_bytes()) != Acc::Yes {
                        continue;
                    }
                    let accs: Vec<Acc> = specs.iter().map(|sp| self.member(sp, cand.as_bytes())).collect();
                    if form.eval(&accs) == Acc::Yes {
                        return Decided::Sat(Value::Str(cand));
                    }
                }
                let base_dfa = match self.dfa(&base_spec) {
                    Ok(d) => d,
                    Err(e) => return Decided::Unknown(e),
                };
                match self.lazy_search(&base_dfa, &specs, form) {
                    Ok(Found::Yes { witness, sure: true }) => match String::from_utf8(witness) {
                        Ok(s) => Decided::Sat(Value::Str(s)),
                        Err(_) => Decided::Unknown("only a value that is not UTF-8 satisfies the tests".into()),
                    },
                    Ok(Found::Yes { .. }) => Decided::Unknown("a Unicode word boundary next to non-ASCII text".into()),
                    Ok(Found::No) => Decided::Unsat,
                    Ok(Found::Unknown) => Decided::Unknown("the string tests are too large to decide".into()),
                    Err(e) => Decided::Unknown(e),
                }
            }
            SymKind::List(elem) => self.decide_list(elem, form, ids),
        }
    }

    /// A list satisfies `form` over atoms "some element in L_i" and "empty": try each
    /// assignment of the atoms (few in practice) and build the elements.
    fn decide_list(&mut self, elem: Option<LangSpec>, form: &Form, ids: &[AtomId]) -> Decided {
        if ids.len() > 12 {
            return Decided::Unknown("too many tests on one list".into());
        }
        let base = match &elem {
            Some(b) => self.dfa(b),
            None => self.dfa(&LangSpec::bytes(String::new(), View::Whole)),
        };
        let Ok(base) = base else { return Decided::Unknown("list element language".into()) };
        let kinds: Vec<AtomKind> = ids.iter().map(|a| self.atoms[*a as usize].1.clone()).collect();
        let mut dfas: Vec<Option<Rc<Dfa>>> = Vec::new();
        for k in &kinds {
            dfas.push(match k {
                AtomKind::ListAny(spec) => match self.dfa(spec) {
                    Ok(d) => Some(d),
                    Err(e) => return Decided::Unknown(e),
                },
                _ => None,
            });
        }
        let n = ids.len();
        'assign: for mask in 0u32..(1u32 << n) {
            let accs: Vec<Acc> = (0..n).map(|i| if mask & (1 << i) != 0 { Acc::Yes } else { Acc::No }).collect();
            if form.eval(&accs) != Acc::Yes {
                continue;
            }
            let empty = kinds.iter().enumerate().any(|(i, k)| *k == AtomKind::ListEmpty && mask & (1 << i) != 0);
            let nonempty = kinds.iter().enumerate().any(|(i, k)| *k == AtomKind::ListEmpty && mask & (1 << i) == 0);
            let want: Vec<usize> = (0..n).filter(|i| dfas[*i].is_some() && mask & (1 << i) != 0).collect();
            let avoid: Vec<&Dfa> = (0..n).filter(|i| mask & (1 << i) == 0).filter_map(|i| dfas[i].as_deref()).collect();
            if empty {
                if want.is_empty() {
                    return Decided::Sat(Value::List(Vec::new()));
                }
                continue;
            }
            let mut elems = Vec::new();
            let mut targets: Vec<Option<usize>> = want.iter().map(|w| Some(*w)).collect();
            if targets.is_empty() && nonempty {
                targets.push(None);
            }
            for t in targets {
                let mut atoms: Vec<&Dfa> = avoid.clone();
                let mut f = Form::And((0..avoid.len()).map(|i| Form::Not(Box::new(Form::Atom(i)))).collect());
                if let Some(w) = t {
                    if let Some(d) = dfas[w].as_deref() {
                        atoms.push(d);
                        if let Form::And(v) = &mut f {
                            v.push(Form::Atom(atoms.len() - 1));
                        }
                    }
                }
                match auto::search(&base, &atoms, &f, SEARCH_LIMIT) {
                    Found::Yes { witness, sure: true } => match String::from_utf8(witness) {
                        Ok(s) => elems.push(s),
                        Err(_) => continue 'assign,
                    },
                    Found::No => continue 'assign,
                    _ => return Decided::Unknown("list tests too large to decide".into()),
                }
            }
            return Decided::Sat(Value::List(elems));
        }
        Decided::Unsat
    }

    /// Is `spec`'s test true of this text? (With the `regex` crate: no automaton to build.)
    pub fn member(&mut self, spec: &LangSpec, x: &[u8]) -> Acc {
        let viewed = || -> Vec<u8> {
            let s = String::from_utf8_lossy(x);
            let (local, domain) = crate::address::split(&s);
            let v: Vec<u8> = match spec.view {
                View::Whole => x.to_vec(),
                View::Domain => domain.into_bytes(),
                View::Local => local.as_bytes().to_vec(),
                View::Detail => crate::address::detail(local).as_bytes().to_vec(),
            };
            let mut full = spec.prefix.clone();
            full.extend_from_slice(&v);
            full.extend_from_slice(&spec.suffix);
            full
        };
        if let Some(f) = &spec.fast {
            return if f.test(&viewed()) { Acc::Yes } else { Acc::No };
        }
        if spec.syntax == Syntax::Policy {
            if let Some(re) = self.policy_regexes.get(&spec.pattern) {
                let full = viewed();
                if let Ok(t) = std::str::from_utf8(&full) {
                    return if re.is_match(t) { Acc::Yes } else { Acc::No };
                }
            }
        }
        let key = spec.clone();
        if !self.regexes.contains_key(&key) {
            use regex_automata::meta;
            let sc = match spec.syntax {
                Syntax::Bytes => {
                    regex_automata::util::syntax::Config::new().unicode(false).utf8(false).case_insensitive(true)
                }
                Syntax::Policy => regex_automata::util::syntax::Config::new().case_insensitive(true),
                Syntax::Table { case_insensitive } => {
                    regex_automata::util::syntax::Config::new().case_insensitive(case_insensitive)
                }
            };
            // A lazy DFA only: testing a few texts does not pay for building a full one.
            let b = meta::Builder::new()
                .configure(meta::Config::new().dfa(false).utf8_empty(false))
                .syntax(sc)
                .build(&spec.pattern)
                .map_err(|e| e.to_string());
            self.regexes.insert(key.clone(), b);
        }
        let Some(Ok(re)) = self.regexes.get(&key) else {
            return match self.dfa(spec) {
                Ok(d) => d.matches(x),
                Err(_) => Acc::Maybe,
            };
        };
        if re.is_match(viewed().as_slice()) {
            Acc::Yes
        } else {
            Acc::No
        }
    }

    /// Search a conjunction part by part: start with the conjuncts that are not a negated
    /// test (those rarely make it unsatisfiable), find a string, add the conjuncts it
    /// violates, search again. A part that has no string means the whole has none; a
    /// string that satisfies every conjunct is the answer. Automata are built only for the
    /// tests a search needs. Other formulas are searched whole.
    fn lazy_search(&mut self, base: &Dfa, specs: &[LangSpec], form: &Form) -> Result<Found, String> {
        let conjuncts: Vec<Form> = match form {
            Form::And(v) if specs.len() > 8 => v.clone(),
            _ => {
                let mut dfas = Vec::new();
                for sp in specs {
                    dfas.push(self.dfa(sp).map_err(|e| format!("pattern `{}`: {e}", sp.pattern))?);
                }
                let refs: Vec<&Dfa> = dfas.iter().map(|d| d.as_ref()).collect();
                return Ok(auto::search(base, &refs, form, SEARCH_LIMIT));
            }
        };
        let negated = |f: &Form| matches!(f, Form::Not(inner) if matches!(**inner, Form::Atom(_)));
        let mut chosen: Vec<usize> = (0..conjuncts.len()).filter(|i| !negated(&conjuncts[*i])).collect();
        for _ in 0..64 {
            // The atoms the chosen conjuncts use, renumbered.
            let mut used: Vec<usize> = Vec::new();
            for c in &chosen {
                atoms_in(&conjuncts[*c], &mut used);
            }
            used.sort();
            used.dedup();
            let mut dfas = Vec::new();
            for u in &used {
                let sp = &specs[*u];
                dfas.push(self.dfa(sp).map_err(|e| format!("pattern `{}`: {e}", sp.pattern))?);
            }
            let refs: Vec<&Dfa> = dfas.iter().map(|d| d.as_ref()).collect();
            let sub = Form::And(chosen.iter().map(|i| renumber(&conjuncts[*i], &used)).collect());
            match auto::search(base, &refs, &simplify(sub), SEARCH_LIMIT) {
                Found::Yes { witness, sure: true } => {
                    let accs: Vec<Acc> = specs.iter().map(|sp| self.member(sp, &witness)).collect();
                    let violated: Vec<usize> = (0..conjuncts.len())
                        .filter(|i| !chosen.contains(i) && conjuncts[*i].eval(&accs) != Acc::Yes)
                        .take(16)
                        .collect();
                    if violated.is_empty() {
                        return Ok(Found::Yes { witness, sure: true });
                    }
                    chosen.extend(violated);
                }
                other => return Ok(other),
            }
        }
        let mut dfas = Vec::new();
        for sp in specs {
            dfas.push(self.dfa(sp).map_err(|e| format!("pattern `{}`: {e}", sp.pattern))?);
        }
        let refs: Vec<&Dfa> = dfas.iter().map(|d| d.as_ref()).collect();
        Ok(auto::search(base, &refs, form, SEARCH_LIMIT))
    }

    /// Values tried before searching, by what the symbol is.
    fn preferred(&self, sym: SymId) -> Vec<String> {
        let s = &self.syms[sym as usize];
        let fact = match &s.origin {
            Origin::Fact { fact, .. } => *fact,
            Origin::Copy { of, .. } => match &self.syms[*of as usize].origin {
                Origin::Fact { fact, .. } => fact,
                _ => "",
            },
            Origin::ClientName | Origin::ClientPtr => "name",
            _ => "",
        };
        let v: &[&str] = match fact {
            "helo.name" => &["attacker.test", "mail.attacker.test"],
            "name" => &["unknown", "attacker.test", "mail.attacker.test"],
            "sender" => &["user@attacker.test", ""],
            "recipient" => &["victim@relay-target.test"],
            _ => &[""],
        };
        v.iter().map(|s| s.to_string()).collect()
    }
}

fn atoms_in(f: &Form, out: &mut Vec<usize>) {
    match f {
        Form::Atom(i) => out.push(*i),
        Form::Not(g) => atoms_in(g, out),
        Form::And(v) | Form::Or(v) => v.iter().for_each(|g| atoms_in(g, out)),
        _ => {}
    }
}

fn renumber(f: &Form, used: &[usize]) -> Form {
    match f {
        Form::Atom(i) => Form::Atom(used.iter().position(|u| u == i).unwrap_or(0)),
        Form::Not(g) => Form::Not(Box::new(renumber(g, used))),
        Form::And(v) => Form::And(v.iter().map(|g| renumber(g, used)).collect()),
        Form::Or(v) => Form::Or(v.iter().map(|g| renumber(g, used)).collect()),
        other => other.clone(),
    }
}

fn ip_form(f: &Form, sets: &[IpSet], base: &IpSet) -> IpSet {
    match f {
        Form::True => base.clone(),
        Form::False => IpSet::empty(),
        Form::Atom(i) => sets.get(*i).cloned().unwrap_or_else(IpSet::empty),
        Form::Not(g) => base.minus(&ip_form(g, sets, base)),
        Form::And(v) => v.iter().fold(base.clone(), |a, g| a.intersect(&ip_form(g, sets, base))),
        Form::Or(v) => v.iter().fold(IpSet::empty(), |a, g| a.union(&ip_form(g, sets, base))),
    }
}

fn num_form(f: &Form, sets: &[NumSet], base: &NumSet) -> NumSet {
    match f {
        Form::True => base.clone(),
        Form::False => NumSet::empty(),
        Form::Atom(i) => sets.get(*i).cloned().unwrap_or_else(NumSet::empty),
        Form::Not(g) => base.intersect(&num_form(g, sets, base).complement()),
        Form::And(v) => v.iter().fold(base.clone(), |a, g| a.intersect(&num_form(g, sets, base))),
        Form::Or(v) => v.iter().fold(NumSet::empty(), |a, g| a.union(&num_form(g, sets, base))),
    }
}

fn simplify(f: Form) -> Form {
    match f {
        Form::And(v) => {
            let mut out = Vec::new();
            for g in v {
                match simplify(g) {
                    Form::True => {}
                    Form::False => return Form::False,
                    Form::And(w) => out.extend(w),
                    g => out.push(g),
                }
            }
            // `x and not x`.
            let pos: std::collections::HashSet<usize> =
                out.iter().filter_map(|g| if let Form::Atom(i) = g { Some(*i) } else { None }).collect();
            if out.iter().any(|g| matches!(g, Form::Not(inner) if matches!(**inner, Form::Atom(i) if pos.contains(&i))))
            {
                return Form::False;
            }
            match out.len() {
                0 => Form::True,
                1 => out.pop().unwrap_or(Form::True),
                _ => Form::And(out),
            }
        }
        Form::Or(v) => {
            let mut out = Vec::new();
            for g in v {
                match simplify(g) {
                    Form::False => {}
                    Form::True => return Form::True,
                    g => out.push(g),
                }
            }
            match out.len() {
                0 => Form::False,
                1 => out.pop().unwrap_or(Form::False),
                _ => Form::Or(out),
            }
        }
        other => other,
    }
}

/// The atoms of each symbol, numbered in order of first use (an atom has one symbol).
#[derive(Default)]
struct AtomIdx {
    v: BTreeMap<SymId, Vec<AtomId>>,
    pos: HashMap<AtomId, usize>,
}

fn atom_index(atoms: &mut AtomIdx, sym: SymId, a: AtomId) -> usize {
    if let Some(i) = atoms.pos.get(&a) {
        return *i;
    }
    let v = atoms.v.entry(sym).or_default();
    v.push(a);
    atoms.pos.insert(a, v.len() - 1);
    v.len() - 1
}

fn project_lit(w: &World, lit: &Lit, atoms: &mut AtomIdx) -> Vec<(SymId, Form)> {
    match lit {
        Lit::Atom(a, pol) => {
            let sym = w.atom_sym(*a);
            let i = atom_index(atoms, sym, *a);
            let f = if *pol { Form::Atom(i) } else { Form::Not(Box::new(Form::Atom(i))) };
            vec![(sym, f)]
        }
        Lit::Or(branches) => {
            let mut per: Vec<BTreeMap<SymId, Vec<Form>>> = Vec::new();
            for b in branches {
                let mut m: BTreeMap<SymId, Vec<Form>> = BTreeMap::new();
                for l in b.iter() {
                    for (s, f) in project_lit(w, l, atoms) {
                        m.entry(s).or_default().push(f);
                    }
                }
                per.push(m);
            }
            let Some(first) = per.first() else { return vec![(0, Form::False)] };
            let mut out = Vec::new();
            for sym in first.keys() {
                if per.iter().all(|m| m.contains_key(sym)) {
                    let alts: Vec<Form> = per.iter().map(|m| Form::And(m[sym].clone())).collect();
                    out.push((*sym, Form::Or(alts)));
                }
            }
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_keeps_common_prefix() {
        let mut w = World::default();
        let s = w.sym(Origin::Fact { run: 0, fact: "helo.name" }, SymKind::Str(None), true);
        let a = w.atom(s, AtomKind::Lang(LangSpec::exact(&["a"])));
        let b = w.atom(s, AtomKind::Lang(LangSpec::exact(&["b"])));
        let base = Conj::top().with(Lit::Atom(a, false));
        let x = base.with(Lit::Atom(b, true));
        let y = base.with(Lit::Atom(b, false));
        let h = Conj::hull(&x, &y);
        assert_eq!(h.len(), 1, "b and not b join to nothing");
        let m = w.solve(&x).unwrap();
        assert_eq!(m.values[&s], Value::Str("b".into()));
        let contra = base.with(Lit::Atom(a, true));
        assert!(w.solve(&contra).is_err());
    }
}

/// A pattern's `\xHH` escapes undone (the patterns this module writes).
fn unescape_bytes(p: &str) -> String {
    let mut out = String::new();
    let mut it = p.chars().peekable();
    while let Some(c) = it.next() {
        if c == '\\' && it.peek() == Some(&'x') {
            it.next();
            let h: String = it.by_ref().take(2).collect();
            if let Ok(b) = u8::from_str_radix(&h, 16) {
                out.push(b as char);
            }
        } else if c != '\\' {
            out.push(c);
        }
    }
    out
}
