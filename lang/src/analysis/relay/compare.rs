//! Tests on symbolic values: each comparison becomes atoms over the symbols it reads.

use super::auto;
use super::explore::*;
use super::sym::{AtomKind, LangSpec, Origin, SymKind, View};
use super::term::{IpV, ListV, NumV, Part, Term, B, V};
use super::witness::Meaning;
use super::{Known, Prover};
use crate::ir::*;

impl Prover<'_> {
    pub(super) fn test(&mut self, run: u32, lhs: &V, op: &Op, id: ExprId) -> B {
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
    pub(super) fn op_spec(&self, op: &Op) -> Option<Vec<LangSpec>> {
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

    pub(super) fn str_test(&mut self, run: u32, term: &Term, op: &Op, id: ExprId) -> B {
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

    pub(super) fn ip_of_term(&self, term: &Term) -> Option<IpV> {
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

    pub(super) fn list_test(&mut self, run: u32, l: &ListV, spec: &LangSpec) -> B {
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

    pub(super) fn list_op(&mut self, run: u32, l: &ListV, op: &Op, id: ExprId) -> B {
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

    pub(super) fn ip_in(&mut self, ip: &IpV, set: &super::sets::IpSet) -> B {
        match ip {
            IpV::Const(a) => B::Const(set.contains(*a)),
            IpV::Sym(s) => B::atom(self.w.atom(*s, AtomKind::Ip(set.clone()))),
        }
    }

    pub(super) fn ip_test(&mut self, run: u32, ip: &IpV, op: &Op, id: ExprId) -> B {
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

    pub(super) fn num_test(&mut self, n: &NumV, c: CmpOp, rhs: f64) -> B {
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

    pub(super) fn is_fingerprint(&self, v: &V) -> bool {
        matches!(v, V::Str(t) if matches!(t.0.as_slice(), [Part::Sym(s, View::Whole)] if *s == self.session.fingerprint))
    }

    /// `VALUE in TABLE`.
    pub(super) fn table_in(&mut self, run: u32, t: u32, v: &V, id: ExprId) -> B {
        if self.is_fingerprint(v) {
            // A certificate's SHA-256 fingerprint is no one's to choose.
            return B::Const(false);
        }
        let known = self.tables.get(t as usize).and_then(Option::as_ref);
        match (known, v) {
            (Some(Known::Keys(keys)), V::Str(term)) => {
                let ks: Vec<&str> = keys.iter().map(|(k, _)| k).collect();
                let spec = LangSpec::exact(&ks);
                if ks.is_empty() {
                    return B::Const(false);
                }
                self.string_test(run, term, &spec)
            }
            (Some(Known::Keys(keys)), V::Ip(ip)) => {
                let set = keys
                    .iter()
                    .filter_map(|(k, _)| k.parse::<std::net::IpAddr>().ok().filter(|a| a.to_string() == k))
                    .fold(super::sets::IpSet::empty(), |a, x| a.union(&super::sets::IpSet::single(x)));
                self.ip_in(ip, &set)
            }
            (Some(Known::Cidr(rows)), V::Ip(ip)) => {
                let set = super::sets::IpSet::of_cidrs(rows.iter().map(|(c, _)| c));
                self.ip_in(ip, &set)
            }
            (Some(Known::Patterns(rows)), V::Str(term)) => {
                let mut alts = Vec::new();
                for (pat, ci, _) in rows {
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
    pub(super) fn lookup_test(&mut self, run: u32, t: u32, key: &Term, op: &Op, id: ExprId) -> B {
        let known = self.tables.get(t as usize).and_then(Option::as_ref);
        match known {
            Some(Known::Keys(rows)) => {
                let mut values: Vec<String> = rows.iter().map(|(_, v)| v.to_string()).collect();
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
                    .filter(|(_, v)| truth.get(*v).copied().unwrap_or(false) != empty)
                    .map(|(k, _)| k)
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
                for (c, v) in rows {
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
                for (pat, ci, v) in rows {
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

    pub(super) fn unknown_lookup_test(&mut self, run: u32, t: u32, key: &Term, op: &Op, id: ExprId) -> B {
        if self.is_fingerprint(&V::Str(key.clone())) {
            return self.test(run, &V::Str(Term::default()), op, id);
        }
        let s = self.table_value_sym(t, key);
        self.test(run, &V::Str(Term::sym(s, View::Whole)), op, id)
    }

    // ---- actions ------------------------------------------------------------------------
}
