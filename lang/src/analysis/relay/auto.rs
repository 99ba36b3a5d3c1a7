//! Finite automata over bytes: the decision procedure behind every string test of the
//! open-relay proof.
//!
//! Every test on a string the attacker chooses (`:is`, `:contains`, `:matches`, `:regex`,
//! `in` a list or a table, `is null`) is a regular language. Each becomes an explicit DFA
//! (built with `regex-automata`, with the runtime's own regex syntax and case rules),
//! possibly seen through a *view* (the domain after the last `@`, the local part, the
//! `+detail`, with a fixed prefix and suffix around the value). Whether some string
//! satisfies a boolean combination of such languages is decided by a breadth-first search
//! over the product of the automata: exact, and it yields the shortest witness.
//!
//! Acceptance is three-valued: `Maybe` stands for a state the regex engine could not
//! decide (a Unicode word boundary next to a non-ASCII byte); the search treats it as
//! accepting where that over-approximates and says the witness is uncertain.

use std::collections::HashMap;

use regex_automata::dfa::{dense, Automaton, StartKind};
use regex_automata::util::{start, syntax};
use regex_automata::{Anchored, MatchKind};

/// Acceptance of a state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Acc {
    No,
    Yes,
    Maybe,
}

impl Acc {
    pub fn not(self) -> Acc {
        match self {
            Acc::No => Acc::Yes,
            Acc::Yes => Acc::No,
            Acc::Maybe => Acc::Maybe,
        }
    }
    pub fn and(self, o: Acc) -> Acc {
        match (self, o) {
            (Acc::No, _) | (_, Acc::No) => Acc::No,
            (Acc::Yes, Acc::Yes) => Acc::Yes,
            _ => Acc::Maybe,
        }
    }
    pub fn or(self, o: Acc) -> Acc {
        match (self, o) {
            (Acc::Yes, _) | (_, Acc::Yes) => Acc::Yes,
            (Acc::No, Acc::No) => Acc::No,
            _ => Acc::Maybe,
        }
    }
}

/// An explicit DFA over bytes. States 0, 1 and 2 are the absorbing dead, accepting and
/// undecided states.
#[derive(Clone, Debug)]
pub struct Dfa {
    classes: Box<[u8; 256]>,
    nclass: usize,
    trans: Vec<u32>,
    acc: Vec<Acc>,
    pub start: u32,
}

pub const DEAD: u32 = 0;
pub const TOP: u32 = 1;
pub const MAYBE: u32 = 2;

/// Largest DFA built from one pattern (bytes of the regex engine's tables).
const BUILD_LIMIT: usize = 4 << 20;
/// Largest explicit DFA (states) any construction here makes.
const STATE_LIMIT: usize = 50_000;

/// How a pattern is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Syntax {
    /// A policy's `:regex` (or a `:matches` glob compiled to one): the `regex` crate's
    /// syntax, Unicode, case-insensitive, as the runtime compiles it.
    Policy,
    /// A pattern this module writes: bytes, ASCII case folding (`eq_ignore_ascii_case`).
    Bytes,
    /// A regexp-table row: Unicode; case-insensitive unless the row's `I` flag.
    Table { case_insensitive: bool },
}

fn ascii_lower(b: u8) -> u8 {
    b.to_ascii_lowercase()
}

impl Dfa {
    pub fn step(&self, s: u32, b: u8) -> u32 {
        let c = self.classes[b as usize] as usize;
        self.trans.get(s as usize * self.nclass + c).copied().unwrap_or(DEAD)
    }
    pub fn acc(&self, s: u32) -> Acc {
        self.acc.get(s as usize).copied().unwrap_or(Acc::No)
    }
    pub fn run(&self, mut s: u32, bytes: &[u8]) -> u32 {
        for b in bytes {
            s = self.step(s, *b);
        }
        s
    }
    pub fn matches(&self, bytes: &[u8]) -> Acc {
        self.acc(self.run(self.start, bytes))
    }
    pub fn class(&self, b: u8) -> u8 {
        self.classes[b as usize]
    }
    pub fn states(&self) -> usize {
        self.acc.len()
    }
    /// A state from which acceptance can no longer change.
    pub fn absorbing(&self, s: u32) -> bool {
        s <= MAYBE
    }

    /// The language of `pattern`: strings in which it matches somewhere (a policy's
    /// `:regex` is unanchored; `^` and `$` anchor it).
    pub fn from_regex(pattern: &str, syn: Syntax) -> Result<Dfa, String> {
        let sc = match syn {
            Syntax::Policy => syntax::Config::new().case_insensitive(true),
            Syntax::Table { case_insensitive } => syntax::Config::new().case_insensitive(case_insensitive),
            Syntax::Bytes => syntax::Config::new().unicode(false).utf8(false).case_insensitive(true),
        };
        let re = dense::Builder::new()
            .configure(
                dense::Config::new()
                    .match_kind(MatchKind::All)
                    .start_kind(StartKind::Unanchored)
                    .unicode_word_boundary(true)
                    .dfa_size_limit(Some(BUILD_LIMIT))
                    .determinize_size_limit(Some(BUILD_LIMIT)),
            )
            .syntax(sc)
            .build(pattern)
            .map_err(|e| e.to_string())?;
        let start = re.start_state(&start::Config::new().anchored(Anchored::No)).map_err(|e| e.to_string())?;
        let classes_ra = re.byte_classes();
        let mut classes = Box::new([0u8; 256]);
        let mut reps: Vec<u8> = Vec::new();
        let mut seen: HashMap<u8, u8> = HashMap::new();
        for b in 0..=255u8 {
            let c = classes_ra.get(b);
            let id = *seen.entry(c).or_insert_with(|| {
                reps.push(b);
                (reps.len() - 1) as u8
            });
            classes[b as usize] = id;
        }
        let nclass = reps.len();
        let mut out = Dfa::absorbing_base(classes, nclass);
        let mut ids: HashMap<regex_automata::util::primitives::StateID, u32> = HashMap::new();
        type Sid = regex_automata::util::primitives::StateID;
        let mut work: Vec<(Sid, u32)> = Vec::new();
        let mut map = |sid: Sid, out: &mut Dfa, work: &mut Vec<(Sid, u32)>| -> Result<u32, String> {
            if re.is_match_state(sid) {
                return Ok(TOP);
            }
            if re.is_dead_state(sid) {
                return Ok(DEAD);
            }
            if re.is_quit_state(sid) {
                return Ok(MAYBE);
            }
            if let Some(i) = ids.get(&sid) {
                return Ok(*i);
            }
            if out.acc.len() >= STATE_LIMIT {
                return Err("pattern too large to analyse".into());
            }
            let eoi = re.next_eoi_state(sid);
            let acc = if re.is_match_state(eoi) { Acc::Yes } else { Acc::No };
            let id = out.push_state(acc);
            ids.insert(sid, id);
            work.push((sid, id));
            Ok(id)
        };
        out.start = map(start, &mut out, &mut work)?;
        while let Some((sid, from)) = work.pop() {
            for (c, rep) in reps.iter().enumerate() {
                let next = re.next_state(sid, *rep);
                let to = map(next, &mut out, &mut work)?;
                out.trans[from as usize * nclass + c] = to;
            }
        }
        Ok(out)
    }

    fn absorbing_base(classes: Box<[u8; 256]>, nclass: usize) -> Dfa {
        let mut d = Dfa { classes, nclass, trans: Vec::new(), acc: Vec::new(), start: DEAD };
        d.push_state(Acc::No);
        d.push_state(Acc::Yes);
        d.push_state(Acc::Maybe);
        for s in [DEAD, TOP, MAYBE] {
            for c in 0..nclass {
                d.trans[s as usize * nclass + c] = s;
            }
        }
        d
    }

    fn push_state(&mut self, acc: Acc) -> u32 {
        let id = self.acc.len() as u32;
        self.acc.push(acc);
        self.trans.extend(std::iter::repeat_n(DEAD, self.nclass));
        id
    }

    /// Build a DFA by exploring `key`s from `start`: `next(key, byte)` and `acc(key)`.
    /// `class_of(byte)` groups bytes on which `next` behaves the same.
    fn explore<K: Clone + Eq + std::hash::Hash>(
        start: K,
        class_of: impl Fn(u8) -> Vec<u32>,
        next: impl Fn(&K, u8) -> K,
        acc: impl Fn(&K) -> Acc,
        absorbing: impl Fn(&K) -> Option<u32>,
    ) -> Result<Dfa, String> {
        let mut classes = Box::new([0u8; 256]);
        let mut reps: Vec<u8> = Vec::new();
        let mut seen: HashMap<Vec<u32>, u8> = HashMap::new();
        for b in 0..=255u8 {
            let key = class_of(b);
            let id = match seen.get(&key) {
                Some(i) => *i,
                None => {
                    reps.push(b);
                    let i = (reps.len() - 1) as u8;
                    seen.insert(key, i);
                    i
                }
            };
            classes[b as usize] = id;
        }
        let nclass = reps.len();
        let mut out = Dfa::absorbing_base(classes, nclass);
        let mut ids: HashMap<K, u32> = HashMap::new();
        let mut work: Vec<(K, u32)> = Vec::new();
        let mut intern = |k: K, out: &mut Dfa, work: &mut Vec<(K, u32)>| -> Result<u32, String> {
            if let Some(a) = absorbing(&k) {
                return Ok(a);
            }
            if let Some(i) = ids.get(&k) {
                return Ok(*i);
            }
            if out.acc.len() >= STATE_LIMIT {
                return Err("automaton too large to analyse".into());
            }
            let id = out.push_state(acc(&k));
            ids.insert(k.clone(), id);
            work.push((k, id));
            Ok(id)
        };
        out.start = intern(start, &mut out, &mut work)?;
        while let Some((k, from)) = work.pop() {
            for (c, rep) in reps.iter().enumerate() {
                let to = intern(next(&k, *rep), &mut out, &mut work)?;
                out.trans[from as usize * nclass + c] = to;
            }
        }
        Ok(out)
    }

    /// `{ w : prefix · w · suffix ∈ L }`.
    pub fn with_affixes(&self, prefix: &[u8], suffix: &[u8]) -> Dfa {
        if prefix.is_empty() && suffix.is_empty() {
            return self.clone();
        }
        let mut d = self.clone();
        d.start = self.run(self.start, prefix);
        for s in 3..d.acc.len() {
            d.acc[s] = self.acc(self.run(s as u32, suffix));
        }
        d
    }

    /// Over a whole address `local@domain`: `L` applied to the part after the last `@`,
    /// ASCII-lower-cased (the empty string when there is no `@`), as `address::split` does.
    pub fn domain_view(&self) -> Result<Dfa, String> {
        // Key: None = no `@` seen yet; Some(s) = the inner state since the last `@`.
        let inner = self;
        let empty_acc = inner.acc(inner.start);
        Dfa::explore(
            None::<u32>,
            |b| vec![inner.class(ascii_lower(b)) as u32, (b == b'@') as u32],
            |k, b| {
                if b == b'@' {
                    Some(inner.start)
                } else {
                    k.map(|s| inner.step(s, ascii_lower(b)))
                }
            },
            |k| match k {
                None => empty_acc,
                Some(s) => inner.acc(*s),
            },
            |_| None,
        )
    }

    /// Over a whole address: `L` applied to the part before the last `@` (the whole string
    /// when there is none).
    pub fn local_view(&self) -> Result<Dfa, String> {
        let inner = self;
        // (state over everything read, an `@` was seen, L's acceptance at the last `@`)
        Dfa::explore(
            (inner.start, false, Acc::No),
            |b| vec![inner.class(b) as u32, (b == b'@') as u32],
            |(s, seen, at), b| {
                if b == b'@' {
                    (inner.step(*s, b), true, inner.acc(*s))
                } else {
                    (inner.step(*s, b), *seen, *at)
                }
            },
            |(s, seen, at)| if *seen { *at } else { inner.acc(*s) },
            |_| None,
        )
    }

    /// Over a whole address: `L` applied to the local part's detail (after its first `+`,
    /// empty when it has none), as `address::detail(split(a).0)`.
    pub fn detail_view(&self) -> Result<Dfa, String> {
        let inner = self;
        let empty_acc = inner.acc(inner.start);
        // (in detail, inner state, an `@` seen, acceptance at the last `@`)
        Dfa::explore(
            (false, inner.start, false, Acc::No),
            |b| vec![inner.class(b) as u32, (b == b'@') as u32, (b == b'+') as u32],
            |(in_detail, s, seen, at), b| {
                let now = if *in_detail { inner.acc(*s) } else { empty_acc };
                let (in_detail2, s2) = if *in_detail {
                    (true, inner.step(*s, b))
                } else if b == b'+' {
                    (true, inner.start)
                } else {
                    (false, *s)
                };
                if b == b'@' {
                    (in_detail2, s2, true, now)
                } else {
                    (in_detail2, s2, *seen, *at)
                }
            },
            |(in_detail, s, seen, at)| {
                if *seen {
                    *at
                } else if *in_detail {
                    inner.acc(*s)
                } else {
                    empty_acc
                }
            },
            |_| None,
        )
    }
}

/// A pattern matching exactly `s`, ignoring ASCII case (`eq_ignore_ascii_case`).
pub fn exact(items: &[&str]) -> String {
    let alts: Vec<String> = items.iter().map(|i| escape_bytes(i.as_bytes())).collect();
    format!("\\A(?:{})\\z", alts.join("|"))
}

/// A pattern matching strings that contain `s`, ignoring ASCII case.
pub fn contains(items: &[&str]) -> String {
    let alts: Vec<String> = items.iter().map(|i| escape_bytes(i.as_bytes())).collect();
    format!("(?:{})", alts.join("|"))
}

/// A pattern for a `domains` list: `example.com` exactly, `.example.com` its subdomains;
/// ASCII case ignored and trailing dots trimmed, as `address::domain_matches`.
pub fn domain_list(items: &[String]) -> String {
    let mut alts = Vec::new();
    for i in items {
        match i.strip_prefix('.') {
            Some(suffix) => alts.push(format!("(?s:.)+\\.{}", escape_bytes(suffix.as_bytes()))),
            None => alts.push(escape_bytes(i.as_bytes())),
        }
    }
    if alts.is_empty() {
        return "[^\\x00-\\xff]".into();
    }
    format!("\\A(?:{})\\.*\\z", alts.join("|"))
}

/// Bytes as a pattern of the `Bytes` syntax.
pub fn escape_bytes(b: &[u8]) -> String {
    let mut out = String::new();
    for &c in b {
        if c.is_ascii_alphanumeric() {
            out.push(c as char);
        } else {
            out.push_str(&format!("\\x{c:02x}"));
        }
    }
    out
}

/// A boolean formula over atoms `0..n`, evaluated on their acceptances.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Form {
    True,
    False,
    Atom(usize),
    Not(Box<Form>),
    And(Vec<Form>),
    Or(Vec<Form>),
}

impl Form {
    pub fn eval(&self, a: &[Acc]) -> Acc {
        match self {
            Form::True => Acc::Yes,
            Form::False => Acc::No,
            Form::Atom(i) => a.get(*i).copied().unwrap_or(Acc::Maybe),
            Form::Not(f) => f.eval(a).not(),
            Form::And(v) => v.iter().fold(Acc::Yes, |x, f| x.and(f.eval(a))),
            Form::Or(v) => v.iter().fold(Acc::No, |x, f| x.or(f.eval(a))),
        }
    }
}

/// What a search found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Found {
    /// A string satisfying the formula; `sure` is false when an undecided state was
    /// taken as accepting.
    Yes { witness: Vec<u8>, sure: bool },
    /// No string satisfies it.
    No,
    /// The search ran past its bound.
    Unknown,
}

/// Bytes tried first, so witnesses read like the addresses and names an attacker sends.
fn preference() -> Vec<u8> {
    let mut v: Vec<u8> = (b'a'..=b'z').collect();
    v.extend(b'0'..=b'9');
    v.extend(b".-@_+%!".iter().copied());
    v.extend(b'A'..=b'Z');
    for b in 0..=255u8 {
        if !v.contains(&b) {
            v.push(b);
        }
    }
    v
}

/// Search for the shortest string accepted by `base` for which `form` holds over `atoms`.
pub fn search(base: &Dfa, atoms: &[&Dfa], form: &Form, limit: usize) -> Found {
    // Joint byte classes: bytes on which every automaton steps alike.
    let pref = preference();
    let mut reps: Vec<u8> = Vec::new();
    let mut seen: std::collections::HashSet<Vec<u8>> = std::collections::HashSet::new();
    for &b in &pref {
        let mut key = Vec::with_capacity(atoms.len() + 1);
        key.push(base.class(b));
        key.extend(atoms.iter().map(|d| d.class(b)));
        if seen.insert(key) {
            reps.push(b);
        }
    }
    let start: Vec<u32> = std::iter::once(base.start).chain(atoms.iter().map(|d| d.start)).collect();
    let accept = |st: &[u32]| -> Acc {
        let b = base.acc(st[0]);
        if b == Acc::No {
            return Acc::No;
        }
        let accs: Vec<Acc> = atoms.iter().zip(&st[1..]).map(|(d, s)| d.acc(*s)).collect();
        b.and(form.eval(&accs))
    };
    let mut index: HashMap<Vec<u32>, usize> = HashMap::new();
    let mut nodes: Vec<(Vec<u32>, usize, u8)> = Vec::new();
    index.insert(start.clone(), 0);
    nodes.push((start, usize::MAX, 0));
    let mut head = 0;
    let mut best_maybe: Option<usize> = None;
    while head < nodes.len() {
        let st = nodes[head].0.clone();
        match accept(&st) {
            Acc::Yes => return Found::Yes { witness: path(&nodes, head), sure: true },
            Acc::Maybe if best_maybe.is_none() => best_maybe = Some(head),
            _ => {}
        }
        // Once every automaton is absorbing, acceptance cannot change: no need to go on.
        let settled = base.absorbing(st[0]) && atoms.iter().zip(&st[1..]).all(|(d, s)| d.absorbing(*s));
        if !settled && st[0] != DEAD {
            for &b in &reps {
                let mut next = Vec::with_capacity(st.len());
                next.push(base.step(st[0], b));
                if next[0] == DEAD {
                    continue;
                }
                next.extend(atoms.iter().zip(&st[1..]).map(|(d, s)| d.step(*s, b)));
                if !index.contains_key(&next) {
                    if nodes.len() >= limit {
                        return match best_maybe {
                            Some(i) => Found::Yes { witness: path(&nodes, i), sure: false },
                            None => Found::Unknown,
                        };
                    }
                    index.insert(next.clone(), nodes.len());
                    nodes.push((next, head, b));
                }
            }
        }
        head += 1;
    }
    match best_maybe {
        Some(i) => Found::Yes { witness: path(&nodes, i), sure: false },
        None => Found::No,
    }
}

fn path(nodes: &[(Vec<u32>, usize, u8)], mut i: usize) -> Vec<u8> {
    let mut out = Vec::new();
    while i != 0 && i != usize::MAX {
        out.push(nodes[i].2);
        i = nodes[i].1;
    }
    out.reverse();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(p: &str) -> Dfa {
        Dfa::from_regex(p, Syntax::Policy).unwrap()
    }

    #[test]
    fn unanchored_and_anchored() {
        assert_eq!(d("foo").matches(b"xxfooyy"), Acc::Yes);
        assert_eq!(d("^foo$").matches(b"xxfooyy"), Acc::No);
        assert_eq!(d("^foo$").matches(b"FOO"), Acc::Yes);
        assert_eq!(d("o$").matches(b"foo"), Acc::Yes);
        assert_eq!(d("").matches(b""), Acc::Yes);
    }

    #[test]
    fn byte_patterns_fold_ascii_only() {
        let e = Dfa::from_regex(&exact(&["Ab.c"]), Syntax::Bytes).unwrap();
        assert_eq!(e.matches(b"aB.C"), Acc::Yes);
        assert_eq!(e.matches(b"aBxC"), Acc::No);
        assert_eq!(e.matches(b"aB.Cx"), Acc::No);
        let k = Dfa::from_regex(&exact(&["k"]), Syntax::Bytes).unwrap();
        assert_eq!(k.matches("\u{212a}".as_bytes()), Acc::No, "the Kelvin sign is not an ASCII k");
        let l = Dfa::from_regex(&domain_list(&["example.com".into(), ".example.org".into()]), Syntax::Bytes).unwrap();
        assert_eq!(l.matches(b"EXAMPLE.com"), Acc::Yes);
        assert_eq!(l.matches(b"example.com."), Acc::Yes);
        assert_eq!(l.matches(b"a.example.com"), Acc::No);
        assert_eq!(l.matches(b"a.example.org"), Acc::Yes);
        assert_eq!(l.matches(b"example.org"), Acc::No);
        assert_eq!(l.matches(b"badexample.org"), Acc::No);
    }

    #[test]
    fn views() {
        let local = Dfa::from_regex(&exact(&["example.com"]), Syntax::Bytes).unwrap();
        let dv = local.domain_view().unwrap();
        assert_eq!(dv.matches(b"user@EXAMPLE.com"), Acc::Yes);
        assert_eq!(dv.matches(b"\"a@example.com\"@other.net"), Acc::No);
        assert_eq!(dv.matches(b"example.com"), Acc::No, "no @: the domain is empty");
        let e = Dfa::from_regex(&exact(&[""]), Syntax::Bytes).unwrap();
        assert_eq!(e.domain_view().unwrap().matches(b"postmaster"), Acc::Yes);
        let u = Dfa::from_regex(&exact(&["user"]), Syntax::Bytes).unwrap();
        let lv = u.local_view().unwrap();
        assert_eq!(lv.matches(b"user@x.y"), Acc::Yes);
        assert_eq!(lv.matches(b"user@x@y"), Acc::No);
        assert_eq!(lv.matches(b"user"), Acc::Yes);
        let t = Dfa::from_regex(&exact(&["tag+x"]), Syntax::Bytes).unwrap();
        let det = t.detail_view().unwrap();
        assert_eq!(det.matches(b"user+tag+x@d.e"), Acc::Yes);
        assert_eq!(det.matches(b"user+tag+x@d+e"), Acc::Yes, "a + in the domain is not the detail");
        assert_eq!(det.matches(b"usertag+x@d.e"), Acc::No);
        let ee = Dfa::from_regex(&exact(&[""]), Syntax::Bytes).unwrap().detail_view().unwrap();
        assert_eq!(ee.matches(b"user@d"), Acc::Yes);
        assert_eq!(ee.matches(b"u+@d"), Acc::Yes);
        assert_eq!(ee.matches(b"u+x@d"), Acc::No);
    }

    #[test]
    fn affixes() {
        let a = d("^user@example\\.com$").with_affixes(b"user@", b".com");
        assert_eq!(a.matches(b"example"), Acc::Yes);
        assert_eq!(a.matches(b"other"), Acc::No);
    }

    #[test]
    fn search_finds_shortest() {
        let any = d("");
        let a = d("^ab+c$");
        let b = d("bbb");
        let f = Form::And(vec![Form::Atom(0), Form::Not(Box::new(Form::Atom(1)))]);
        match search(&any, &[&a, &b], &f, 10_000) {
            Found::Yes { witness, sure } => {
                assert_eq!(witness, b"abc");
                assert!(sure);
            }
            other => panic!("{other:?}"),
        }
        let g = Form::And(vec![Form::Atom(0), Form::Not(Box::new(Form::Atom(0)))]);
        assert_eq!(search(&any, &[&a], &g, 10_000), Found::No);
        // Counted repetitions and alternations are decided, not sampled.
        let c = d("^(?:mx|relay)[0-9]{3}\\.partner\\.example$");
        let not_partner = Dfa::from_regex(&exact(&["mx123.partner.example"]), Syntax::Bytes).unwrap();
        let f = Form::And(vec![Form::Atom(0), Form::Not(Box::new(Form::Atom(1)))]);
        match search(&any, &[&c, &not_partner], &f, 100_000) {
            Found::Yes { witness, .. } => assert_eq!(witness, b"mx000.partner.example"),
            other => panic!("{other:?}"),
        }
    }
}
