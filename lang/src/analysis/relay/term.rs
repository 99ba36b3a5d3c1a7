//! Symbolic values: strings as concatenations of literal text and symbols, and yes/no
//! results as formulas over atoms.

use std::net::IpAddr;

use super::sym::{AtomId, Conj, Lit, SymId, View};

/// One piece of a string value.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Part {
    Lit(String),
    /// A symbol, read through a view. An address symbol read whole is the address.
    Sym(SymId, View),
}

/// A string value: the concatenation of its parts.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct Term(pub Vec<Part>);

impl Term {
    pub fn lit(s: &str) -> Term {
        if s.is_empty() {
            Term(Vec::new())
        } else {
            Term(vec![Part::Lit(s.to_string())])
        }
    }
    pub fn sym(s: SymId, v: View) -> Term {
        Term(vec![Part::Sym(s, v)])
    }
    pub fn push(&mut self, p: Part) {
        match (self.0.last_mut(), p) {
            (Some(Part::Lit(a)), Part::Lit(b)) => a.push_str(&b),
            (_, Part::Lit(b)) if b.is_empty() => {}
            (_, p) => self.0.push(p),
        }
    }
    pub fn extend(&mut self, t: &Term) {
        for p in &t.0 {
            self.push(p.clone());
        }
    }
    /// The literal text, when the value has no symbol.
    pub fn as_lit(&self) -> Option<String> {
        let mut s = String::new();
        for p in &self.0 {
            match p {
                Part::Lit(l) => s.push_str(l),
                Part::Sym(..) => return None,
            }
        }
        Some(s)
    }
    pub fn syms(&self) -> impl Iterator<Item = (SymId, View)> + '_ {
        self.0.iter().filter_map(|p| match p {
            Part::Sym(s, v) => Some((*s, *v)),
            Part::Lit(_) => None,
        })
    }
    /// `prefix · (sym, view) · suffix` when the value has exactly one symbol.
    pub fn single(&self) -> Option<(Vec<u8>, SymId, View, Vec<u8>)> {
        let mut pre = Vec::new();
        let mut suf = Vec::new();
        let mut found = None;
        for p in &self.0 {
            match (p, found) {
                (Part::Lit(l), None) => pre.extend_from_slice(l.as_bytes()),
                (Part::Lit(l), Some(_)) => suf.extend_from_slice(l.as_bytes()),
                (Part::Sym(s, v), None) => found = Some((*s, *v)),
                (Part::Sym(..), Some(_)) => return None,
            }
        }
        let (s, v) = found?;
        Some((pre, s, v, suf))
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A list value.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ListV {
    Sym(SymId),
    Lits(Vec<String>),
    /// The accepted recipients: `member` and any others the attacker added (`others`: a
    /// list symbol).
    Recipients {
        member: Term,
        others: SymId,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum IpV {
    Sym(SymId),
    Const(IpAddr),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum NumV {
    Sym(SymId),
    Const(i64),
}

/// A yes/no result: constant, or a formula over atoms.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum B {
    Const(bool),
    Lit(AtomId, bool),
    And(Vec<B>),
    Or(Vec<B>),
}

impl B {
    pub fn atom(a: AtomId) -> B {
        B::Lit(a, true)
    }
    pub fn not(self) -> B {
        match self {
            B::Const(b) => B::Const(!b),
            B::Lit(a, p) => B::Lit(a, !p),
            B::And(v) => B::or(v.into_iter().map(B::not).collect()),
            B::Or(v) => B::and(v.into_iter().map(B::not).collect()),
        }
    }
    pub fn and(v: Vec<B>) -> B {
        let mut out = Vec::new();
        for b in v {
            match b {
                B::Const(true) => {}
                B::Const(false) => return B::Const(false),
                B::And(w) => out.extend(w),
                b => out.push(b),
            }
        }
        match out.len() {
            0 => B::Const(true),
            1 => out.pop().unwrap_or(B::Const(true)),
            _ => B::And(out),
        }
    }
    pub fn or(v: Vec<B>) -> B {
        let mut out = Vec::new();
        for b in v {
            match b {
                B::Const(false) => {}
                B::Const(true) => return B::Const(true),
                B::Or(w) => out.extend(w),
                b => out.push(b),
            }
        }
        match out.len() {
            0 => B::Const(false),
            1 => out.pop().unwrap_or(B::Const(false)),
            _ => B::Or(out),
        }
    }
    /// Add this formula to a constraint.
    pub fn assume(&self, c: &Conj) -> Conj {
        match self {
            B::Const(_) => c.clone(),
            B::Lit(a, p) => c.with(Lit::Atom(*a, *p)),
            B::And(v) => v.iter().fold(c.clone(), |c, b| b.assume(&c)),
            B::Or(v) => {
                let branches: Vec<Conj> = v.iter().map(|b| b.assume(&Conj::top())).collect();
                c.with(Lit::Or(branches))
            }
        }
    }
}

/// A value of any type.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum V {
    Str(Term),
    List(ListV),
    Ip(IpV),
    Num(NumV),
    Bool(B),
    /// The value a table gives a key (decided when compared: the table may be known).
    Lookup(u32, Term),
}
