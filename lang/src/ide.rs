//! Language intelligence for editors (`mailc lsp`): the names a policy declares and uses
//! across its includes, hover texts, completion at a position, document symbols. Pure: it
//! reads files only through a [`Loader`], like the compiler, and works on files that do
//! not parse (through [`crate::parse::parse_recovering`] and [`crate::syntax`]).
//!
//! Hover texts come from the catalogue the checker and the spec use: the facts table of
//! [`crate::ir`], [`crate::check::ACTIONS`] and [`crate::check::TESTS`], the settings of
//! [`crate::schema`], and the "Meaning" column of the tests and actions tables of
//! `spec/language.md` (sections 9 and 10), which is compiled in.

use std::collections::HashMap;
use std::path::PathBuf;

use crate::ast::{Arg, Cond, Item, Opt, Stmt, Value, ValueKind};
use crate::check::{ACTIONS, TESTS};
use crate::ir::{Fact, Stage, Stages, Ty};
use crate::schema::{self, OptSpec, OptTy};
use crate::source::{FileId, Loader, SourceFile, SourceMap, Span};
use crate::syntax::{self, Kind, Token, Tree};

/// What a declared name is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeclKind {
    List,
    Table,
    Secret,
    Scanner,
    MailingList,
    Rules,
    /// A `set NAME` (each one is a definition of the variable).
    Var,
    Listener,
}

impl DeclKind {
    pub fn noun(self) -> &'static str {
        match self {
            DeclKind::List => "list",
            DeclKind::Table => "table",
            DeclKind::Secret => "secret",
            DeclKind::Scanner => "scanner",
            DeclKind::MailingList => "mailing list",
            DeclKind::Rules => "rules block",
            DeclKind::Var => "variable",
            DeclKind::Listener => "listener",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Decl {
    pub name: String,
    pub kind: DeclKind,
    /// The name where it is declared.
    pub span: Span,
    /// The whole declaration.
    pub item: Span,
    /// The declaration's first line, e.g. `list trusted = cidr ["10.0.0.0/8"];`.
    pub detail: String,
}

/// A use of a name: a list, table, secret, scanner or rules block, or a variable.
#[derive(Clone, Debug)]
pub struct Ref {
    pub name: String,
    pub var: bool,
    pub span: Span,
}

/// A policy and the files it includes, parsed (with error recovery) but not checked.
pub struct World {
    pub sources: SourceMap,
    pub items: Vec<(FileId, Item)>,
    pub decls: Vec<Decl>,
    pub refs: Vec<Ref>,
    /// Stages each rules block is used in (through `use`, directly or through other blocks).
    pub rule_stages: HashMap<String, Stages>,
    /// `include "..."` strings and the file each one names.
    pub includes: Vec<(Span, PathBuf)>,
}

/// Load `entry` and its includes through `loader`, as the compiler would.
pub fn load(entry: &str, loader: &dyn Loader) -> World {
    let mut w = World {
        sources: SourceMap::default(),
        items: Vec::new(),
        decls: Vec::new(),
        refs: Vec::new(),
        rule_stages: HashMap::new(),
        includes: Vec::new(),
    };
    let path = loader.resolve(entry, None);
    if let Ok(text) = loader.load(&path) {
        let id = w.sources.add(SourceFile::new(entry.to_string(), path, text));
        load_file(&mut w, id, loader, 0);
    }
    w.index();
    w
}

fn load_file(w: &mut World, file: FileId, loader: &dyn Loader, depth: usize) {
    let parsed = crate::parse::parse_recovering(file, &w.sources.get(file).text);
    for item in parsed.file.items {
        if let Item::Include { path, .. } = &item {
            let name = unescape(&path.raw);
            let from = w.sources.get(file).path.clone();
            let target = loader.resolve(&name, Some(&from));
            w.includes.push((path.span, target.clone()));
            if depth < crate::check::MAX_INCLUDE_DEPTH && w.sources.find(&target).is_none() {
                if let Ok(text) = loader.load(&target) {
                    let shown = if name.starts_with("std:") { name.clone() } else { target.display().to_string() };
                    let id = w.sources.add(SourceFile::new(shown, target, text));
                    load_file(w, id, loader, depth + 1);
                }
            }
        }
        w.items.push((file, item));
    }
}

fn unescape(raw: &str) -> String {
    let mut out = String::new();
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(n) = chars.next() {
                out.push(n);
            }
        } else {
            out.push(c);
        }
    }
    out
}

impl World {
    fn index(&mut self) {
        let items = std::mem::take(&mut self.items);
        for (_, item) in &items {
            let decl = |s: &mut World, name: &crate::ast::Ident, kind, item: Span| {
                let detail = s.first_line(item);
                s.decls.push(Decl { name: name.name.clone(), kind, span: name.span, item, detail });
            };
            match item {
                Item::List { name, items: vals, span, .. } => {
                    decl(self, name, DeclKind::List, *span);
                    for v in vals {
                        self.value(v);
                    }
                }
                Item::Resource { kw, name, options, span, .. } => {
                    let kind = match kw {
                        crate::ast::ResourceKw::Table => DeclKind::Table,
                        crate::ast::ResourceKw::Secret => DeclKind::Secret,
                        crate::ast::ResourceKw::Scanner => DeclKind::Scanner,
                        crate::ast::ResourceKw::MailingList => DeclKind::MailingList,
                    };
                    decl(self, name, kind, *span);
                    self.options(options);
                }
                Item::Settings { name, options, span, .. } => {
                    if let Some(n) = name {
                        decl(self, n, DeclKind::Listener, *span);
                    }
                    self.options(options);
                }
                Item::Rules { name, body, span } => {
                    decl(self, name, DeclKind::Rules, *span);
                    self.stmts(body);
                }
                Item::Stage { body, .. } => self.stmts(body),
                Item::Require { .. } | Item::Include { .. } => {}
            }
        }
        // Where each rules block runs.
        let bodies: HashMap<String, &Vec<Stmt>> = items
            .iter()
            .filter_map(|(_, i)| match i {
                Item::Rules { name, body, .. } => Some((name.name.clone(), body)),
                _ => None,
            })
            .collect();
        let mut stages: HashMap<String, Stages> = HashMap::new();
        for (_, i) in &items {
            if let Item::Stage { stage, body, .. } = i {
                if let Some(st) = Stage::from_name(&stage.name) {
                    let mut seen = Vec::new();
                    uses(
                        body,
                        &bodies,
                        &mut |n| {
                            let e = stages.entry(n.to_string()).or_insert(Stages::NONE);
                            *e = e.with(st);
                        },
                        &mut seen,
                    );
                }
            }
        }
        self.rule_stages = stages;
        self.items = items;
    }

    fn first_line(&self, span: Span) -> String {
        let t = self.sources.text(span);
        let line = t.lines().next().unwrap_or("").trim_end();
        if line.len() < t.trim_end().len() && !line.ends_with('{') {
            format!("{line} ...")
        } else {
            line.to_string()
        }
    }

    fn options(&mut self, options: &[Opt]) {
        for o in options {
            self.value(&o.value);
        }
    }

    fn stmts(&mut self, body: &[Stmt]) {
        for s in body {
            match s {
                Stmt::If { arms, otherwise, .. } => {
                    for (c, b) in arms {
                        self.cond(c);
                        self.stmts(b);
                    }
                    if let Some(b) = otherwise {
                        self.stmts(b);
                    }
                }
                Stmt::Action { name, args, span } => {
                    let mut rest = args.as_slice();
                    match (name.name.as_str(), args.first()) {
                        ("set", Some(Arg::Value(Value { kind: ValueKind::Path(v), span: vs }))) => {
                            let detail = self.first_line(*span);
                            self.decls.push(Decl {
                                name: v.clone(),
                                kind: DeclKind::Var,
                                span: *vs,
                                item: *span,
                                detail,
                            });
                            rest = &args[1..];
                        }
                        ("unset", Some(Arg::Value(Value { kind: ValueKind::Path(v), span: vs }))) => {
                            self.refs.push(Ref { name: v.clone(), var: true, span: *vs });
                            rest = &args[1..];
                        }
                        _ => {}
                    }
                    for a in rest {
                        if let Arg::Value(v) = a {
                            self.value(v);
                        }
                    }
                }
            }
        }
    }

    fn cond(&mut self, c: &Cond) {
        match c {
            Cond::Or(parts, _) | Cond::And(parts, _) => {
                for p in parts {
                    self.cond(p);
                }
            }
            Cond::Not(inner, _) => self.cond(inner),
            Cond::Test { term, operand, .. } => {
                if term.name.name == "flag" {
                    if let Some(Arg::Value(Value { kind: ValueKind::Path(v), span })) = term.args.first() {
                        self.refs.push(Ref { name: v.clone(), var: true, span: *span });
                    }
                } else {
                    self.path(&term.name.name, term.name.span);
                    for a in &term.args {
                        if let Arg::Value(v) = a {
                            self.value(v);
                        }
                    }
                }
                if let Some(v) = operand {
                    self.value(v);
                }
            }
        }
    }

    fn path(&mut self, p: &str, span: Span) {
        if let Some(v) = p.strip_prefix("var.") {
            let start = span.start + 4;
            self.refs.push(Ref { name: v.to_string(), var: true, span: Span { start, ..span } });
        } else if Fact::from_name(p).is_none() {
            self.refs.push(Ref { name: p.to_string(), var: false, span });
        }
    }

    fn value(&mut self, v: &Value) {
        match &v.kind {
            ValueKind::Path(p) => self.path(p, v.span),
            ValueKind::List(items) => {
                for i in items {
                    self.value(i);
                }
            }
            ValueKind::Str(s) => {
                // `${var.NAME}` inside the string.
                let mut from = 0;
                while let Some(i) = s.raw[from..].find("${var.") {
                    let start = from + i + 6;
                    let len = s.raw[start..].find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(0);
                    if len > 0 {
                        let name = s.raw[start..start + len].to_string();
                        let at = s.inner_start() + start as u32;
                        self.refs.push(Ref {
                            name,
                            var: true,
                            span: Span { file: v.span.file, start: at, end: at + len as u32 },
                        });
                    }
                    from = start;
                }
            }
            _ => {}
        }
    }

    /// The name (declared or used) at `offset` of `file`: (name, is a variable).
    pub fn name_at(&self, file: FileId, offset: u32) -> Option<(String, bool)> {
        let hit = |s: &Span| s.file == file && s.start <= offset && offset <= s.end;
        if let Some(d) = self.decls.iter().find(|d| hit(&d.span)) {
            return Some((d.name.clone(), d.kind == DeclKind::Var));
        }
        let r = self.refs.iter().find(|r| hit(&r.span))?;
        // A word that names nothing declared is not a reference (`deliver mx`).
        if !r.var && !self.decls.iter().any(|d| d.name == r.name && d.kind != DeclKind::Var) {
            return None;
        }
        Some((r.name.clone(), r.var))
    }

    /// Where a name is declared (for a variable: every `set`).
    pub fn definitions(&self, name: &str, var: bool) -> Vec<&Decl> {
        self.decls.iter().filter(|d| d.name == name && (d.kind == DeclKind::Var) == var).collect()
    }

    /// Every use of a name, and its declarations when `with_decls`.
    pub fn references(&self, name: &str, var: bool, with_decls: bool) -> Vec<Span> {
        let mut out: Vec<Span> = Vec::new();
        if with_decls {
            out.extend(self.definitions(name, var).iter().map(|d| d.span));
        }
        out.extend(self.refs.iter().filter(|r| r.name == name && r.var == var).map(|r| r.span));
        out.sort_by_key(|s| (s.file, s.start));
        out.dedup();
        out
    }

    /// The stages code at `offset` of `file` runs in: the stage of its block, the stages
    /// where a rules block is used (every stage when it is used nowhere), or None outside.
    pub fn stages_at(&self, file: FileId, offset: u32) -> Option<(Stages, Option<String>)> {
        let text = &self.sources.get(file).text;
        let toks = syntax::lex(text);
        let trees = syntax::tree(text, &toks, true);
        let (kids, _) = item_at(text, &toks, &trees, offset)?;
        let words: Vec<&str> = kids
            .iter()
            .take(2)
            .filter_map(|k| match k {
                Tree::Tok(i) if toks[*i].kind == Kind::Word => Some(toks[*i].text(text)),
                _ => None,
            })
            .collect();
        match words.as_slice() {
            ["route", ..] => Some((Stages::one(Stage::Route), None)),
            ["on", name] => Some((Stage::from_name(name).map_or(Stages::ALL, Stages::one), None)),
            ["rules", name] => {
                let st = self.rule_stages.get(*name).copied().filter(|s| *s != Stages::NONE);
                Some((st.unwrap_or(Stages::ALL), Some(name.to_string())))
            }
            _ => None,
        }
    }
}

fn uses(body: &[Stmt], bodies: &HashMap<String, &Vec<Stmt>>, f: &mut dyn FnMut(&str), seen: &mut Vec<String>) {
    for s in body {
        match s {
            Stmt::If { arms, otherwise, .. } => {
                for (_, b) in arms {
                    uses(b, bodies, f, seen);
                }
                if let Some(b) = otherwise {
                    uses(b, bodies, f, seen);
                }
            }
            Stmt::Action { name, args, .. } if name.name == "use" => {
                if let Some(Arg::Value(Value { kind: ValueKind::Path(r), .. })) = args.first() {
                    f(r);
                    if !seen.contains(r) {
                        seen.push(r.clone());
                        if let Some(b) = bodies.get(r) {
                            uses(b, bodies, f, seen);
                        }
                    }
                }
            }
            _ => {}
        }
    }
}

/// The top-level item (as trees) that holds `offset`, and whether `offset` is inside its
/// outermost `{ }`.
fn item_at<'t>(text: &str, toks: &[Token], trees: &'t [Tree], offset: u32) -> Option<(&'t [Tree], bool)> {
    let items = syntax::statements(text, toks, trees, true);
    for (a, b) in items {
        let kids = &trees[a..b];
        let start = toks[kids.first()?.first()].start;
        let last = kids.last()?;
        let open_end = matches!(last, Tree::Group { close: None, .. });
        let end = if open_end { u32::MAX } else { toks[last.last()].end };
        if start <= offset && offset <= end {
            let inside = kids.iter().any(|k| match k {
                Tree::Group { open, close, .. } if toks[*open].text(text) == "{" => {
                    toks[*open].end <= offset && close.is_none_or(|c| offset <= toks[c].start)
                }
                _ => false,
            });
            return Some((kids, inside));
        }
    }
    None
}

// ---- the catalogue ----------------------------------------------------------------------

const SPEC: &str = include_str!("../../spec/language.md");

/// One row of the tests table (section 9) or the actions table (section 10) of the spec.
#[derive(Clone, Debug)]
pub struct SpecRow {
    pub syntax: String,
    pub cells: Vec<String>,
}

fn table_rows(section: &str, until: &str) -> Vec<SpecRow> {
    let Some(start) = SPEC.find(section) else { return Vec::new() };
    let rest = &SPEC[start..];
    let end = rest.find(until).unwrap_or(rest.len());
    rest[..end]
        .lines()
        .filter(|l| l.starts_with("| `"))
        .map(|l| {
            let mut cells = Vec::new();
            let mut cur = String::new();
            let mut tick = false;
            for c in l.trim().trim_matches('|').chars() {
                if c == '`' {
                    tick = !tick;
                }
                if c == '|' && !tick {
                    cells.push(cur.trim().to_string());
                    cur.clear();
                } else {
                    cur.push(c);
                }
            }
            cells.push(cur.trim().to_string());
            SpecRow { syntax: cells.first().cloned().unwrap_or_default().trim_matches('`').to_string(), cells }
        })
        .collect()
}

/// The spec's rows for the test `name` (syntax, gives, stages, capability, meaning).
pub fn test_rows(name: &str) -> Vec<SpecRow> {
    table_rows("## 9. Tests and value functions", "`rate` counters")
        .into_iter()
        .filter(|r| r.syntax.split([' ', ';']).next() == Some(name))
        .collect()
}

/// The spec's rows for the action `name` (syntax, stages, terminal, meaning).
pub fn action_rows(name: &str) -> Vec<SpecRow> {
    table_rows("## 10. Actions", "**Transports**")
        .into_iter()
        .filter(|r| r.syntax.split([' ', ';']).next() == Some(name))
        .collect()
}

/// Stages where each test exists (the checker's rule; `flag` depends on where its variable
/// is set), and what it gives: None for a yes/no test.
pub const TEST_STAGES: &[(&str, Stages, Option<Ty>)] = &[
    ("flag", Stages::ALL, None),
    ("header", Stages::from(Stage::Data), Some(Ty::List)),
    ("lookup", Stages::ALL, Some(Ty::Str)),
    ("rate", Stages::ALL, Some(Ty::Num)),
    ("concurrent", Stages::ALL, Some(Ty::Num)),
    ("score", Stages::from(Stage::Data), Some(Ty::Num)),
    ("dnsbl", Stages::ALL, None),
    ("rhsbl", Stages::ALL, None),
    ("resolvable", Stages::ALL, None),
    ("fqdn", Stages::ALL, None),
    ("batv", Stages::from(Stage::Rcpt), None),
    ("callahead", Stages::one(Stage::Rcpt), None),
    ("greylist", Stages::range(Stage::Rcpt, Stage::Data), None),
    ("login_mismatch", Stages::from(Stage::Mail), None),
];

fn test_capability(name: &str) -> Option<&'static str> {
    match name {
        "rate" | "concurrent" => Some("ratelimit"),
        "score" => Some("spamscan"),
        "dnsbl" | "rhsbl" => Some("dnsbl"),
        "resolvable" => Some("dns"),
        "batv" => Some("batv"),
        "callahead" => Some("callahead"),
        "greylist" => Some("greylist"),
        _ => None,
    }
}

fn stages_text(s: Stages) -> String {
    if s == Stages::ALL {
        "every stage".into()
    } else {
        s.describe()
    }
}

fn fact_hover(f: Fact) -> String {
    let i = f.info();
    let mut s = format!("**fact** `{}`: {}\n\n{}\n\nstages: {}", i.name, i.ty.name(), i.doc, stages_text(i.stages));
    if let Some(c) = i.capability {
        s.push_str(&format!("\n\nneeds `require \"{c}\";`"));
    }
    s
}

fn action_hover(name: &str) -> Option<String> {
    let (_, stages, cap) = ACTIONS.iter().find(|a| a.0 == name)?;
    let mut s = format!("**action** `{name}`: stages {}", stages_text(*stages));
    if let Some(c) = cap {
        s.push_str(&format!("; needs `require \"{c}\";`"));
    }
    for r in action_rows(name) {
        let terminal = r.cells.get(2).map_or("", |t| t.as_str());
        let meaning = r.cells.get(3).map_or("", |t| t.as_str());
        s.push_str(&format!(
            "\n\n`{}` ({}; terminal: {terminal}): {meaning}",
            r.syntax,
            r.cells.get(1).map_or("", |t| t.as_str())
        ));
    }
    Some(s)
}

fn test_hover(name: &str) -> Option<String> {
    let usage = TESTS.iter().find(|t| t.0 == name)?.1;
    let mut s = format!("**test** `{usage}`");
    for r in test_rows(name) {
        let cell = |i: usize| r.cells.get(i).map_or("", |t| t.as_str());
        s.push_str(&format!("\n\ngives {}; stages: {}", cell(1), cell(2)));
        if !cell(3).is_empty() {
            s.push_str(&format!("; needs `require {}`", cell(3).replace('`', "\"")));
        }
        s.push_str(&format!("\n\n{}", cell(4)));
    }
    Some(s)
}

fn opt_ty(t: OptTy) -> String {
    match t {
        OptTy::Str => "a string".into(),
        OptTy::Num => "a number".into(),
        OptTy::Size => "a size".into(),
        OptTy::Duration => "a duration".into(),
        OptTy::Bool => "`true` or `false`".into(),
        OptTy::Word(w) => w.iter().map(|w| format!("`{w}`")).collect::<Vec<_>>().join(" | "),
        OptTy::Strings => "a list of strings".into(),
        OptTy::Secret => "the name of a secret".into(),
        OptTy::Table => "the name of a table".into(),
        OptTy::List => "the name of a list".into(),
    }
}

/// Which settings a block accepts, from the words that open its declaration.
fn settings_for(head: &[&str]) -> Vec<OptSpec> {
    match head {
        ["server", ..] => schema::SERVER.to_vec(),
        ["listener", ..] => schema::LISTENER.to_vec(),
        ["scanner", _, "=", "milter", ..] => schema::SCANNER_MILTER.to_vec(),
        ["scanner", ..] => schema::SCANNER.to_vec(),
        ["mailing_list", ..] => schema::MAILING_LIST.to_vec(),
        ["table", _, "=", kind, ..] => {
            let mut v = schema::TABLE_COMMON.to_vec();
            if let Some((_, _, extra, _)) = schema::TABLE_KINDS.iter().find(|k| k.0 == *kind) {
                v.extend_from_slice(extra);
            }
            v
        }
        ["table", ..] => schema::TABLE_COMMON.to_vec(),
        _ => Vec::new(),
    }
}

// ---- position analysis ------------------------------------------------------------------

/// What is around a position of a file, as tokens.
struct Around<'t> {
    text: &'t str,
    toks: Vec<Token>,
    /// The token the position is in or at the end of, when it is a word or a string.
    at: Option<usize>,
    /// The code token before the word being typed (or before the position).
    prev: Option<usize>,
    prev2: Option<usize>,
    /// The words that open the enclosing top-level item.
    head: Vec<&'t str>,
    inside_block: bool,
    /// The position is at the start of a statement (or setting) of its block.
    stmt_start: bool,
}

fn around(text: &str, offset: u32) -> Around<'_> {
    let toks = syntax::lex(text);
    let at = toks.iter().position(|t| {
        matches!(t.kind, Kind::Word | Kind::Str(_) | Kind::Tag | Kind::Comment) && t.start <= offset && offset <= t.end
    });
    let before = at.unwrap_or_else(|| toks.iter().take_while(|t| t.end <= offset).count());
    let code: Vec<usize> = (0..before).filter(|i| toks[*i].kind != Kind::Comment).collect();
    let prev = code.last().copied();
    let prev2 = code.len().checked_sub(2).map(|i| code[i]);
    let trees = syntax::tree(text, &toks, true);
    let (head, inside_block) = match item_at(text, &toks, &trees, offset) {
        Some((kids, inside)) => (
            kids.iter()
                .take(4)
                .filter_map(|k| match k {
                    Tree::Tok(i) => Some(toks[*i].text(text)),
                    _ => None,
                })
                .collect(),
            inside,
        ),
        None => (Vec::new(), false),
    };
    let stmt_start = match prev {
        None => true,
        Some(p) => {
            let t = toks[p].text(text);
            matches!(t, ";" | "{" | "}") && toks[p].kind == Kind::Punct
        }
    };
    Around { text, toks, at, prev, prev2, head, inside_block, stmt_start }
}

impl Around<'_> {
    fn word(&self, i: Option<usize>) -> &str {
        i.map_or("", |i| self.toks[i].text(self.text))
    }
    fn in_condition(&self) -> bool {
        matches!(self.word(self.prev), "if" | "elsif" | "and" | "or" | "not" | "(" | ",")
    }
}

/// A hover: markdown text and the span it is about.
pub fn hover(world: &World, file: FileId, offset: u32) -> Option<(String, Span)> {
    let text = &world.sources.get(file).text;
    let a = around(text, offset);
    let i = a.at?;
    let t = a.toks[i];
    let span = Span { file, start: t.start, end: t.end };
    let word = t.text(text);
    match t.kind {
        Kind::Word => {}
        Kind::Str(_) if a.head.first() == Some(&"require") => {
            let cap = word.trim_matches('"');
            let (_, what) = schema::CAPABILITIES.iter().find(|c| c.0 == cap)?;
            return Some((format!("**capability** \"{cap}\": enables {what}"), span));
        }
        _ => return None,
    }
    if let Some((name, var)) = world.name_at(file, offset) {
        let defs = world.definitions(&name, var);
        if let Some(d) = defs.first() {
            let (line, _) = world.sources.line_col(d.span);
            let where_ = format!("{}:{line}", world.sources.get(d.span.file).name);
            return Some((
                format!("**{}** `{name}`\n\n```mailpolicy\n{}\n```\n\ndeclared at {where_}", d.kind.noun(), d.detail),
                span,
            ));
        }
    }
    if a.word(a.prev) == "on" && a.prev == i.checked_sub(1) {
        let st = Stage::from_name(word)?;
        return Some((
            format!("**stage** `{}`: {}", st.name(), if st.is_session() { "a session stage" } else { "a queue stage" }),
            span,
        ));
    }
    if a.inside_block {
        let settings = settings_for(&a.head);
        if !settings.is_empty() {
            let o = settings.iter().find(|o| o.name == word)?;
            return Some((format!("**setting** `{}`: {}\n\n{}", o.name, opt_ty(o.ty), o.describe()), span));
        }
    }
    if let Some(f) = Fact::from_name(word) {
        return Some((fact_hover(f), span));
    }
    let is_action = ACTIONS.iter().any(|x| x.0 == word);
    let is_test = TESTS.iter().any(|x| x.0 == word);
    if is_action && (a.stmt_start || !is_test) {
        return action_hover(word).map(|h| (h, span));
    }
    if is_test {
        return test_hover(word).map(|h| (h, span));
    }
    None
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompletionKind {
    Fact,
    Test,
    Action,
    Keyword,
    Name(DeclKind),
    Setting,
    Value,
    Stage,
}

#[derive(Clone, Debug)]
pub struct Completion {
    pub label: String,
    pub kind: CompletionKind,
    pub detail: String,
    pub doc: String,
}

/// Completions at `offset` of `file`, and the span the chosen one replaces.
pub fn complete(world: &World, file: FileId, offset: u32) -> (Vec<Completion>, Span) {
    let text = &world.sources.get(file).text;
    let a = around(text, offset);
    let mut out = Vec::new();
    let mut replace = Span { file, start: offset, end: offset };
    let c = |label: &str, kind, detail: String, doc: String| Completion { label: label.to_string(), kind, detail, doc };
    let names = |out: &mut Vec<Completion>, kinds: &[DeclKind]| {
        let mut seen = Vec::new();
        for d in &world.decls {
            if kinds.contains(&d.kind) && !seen.contains(&d.name) {
                seen.push(d.name.clone());
                out.push(c(&d.name, CompletionKind::Name(d.kind), d.kind.noun().to_string(), d.detail.clone()));
            }
        }
    };
    if let Some(i) = a.at {
        let t = a.toks[i];
        match t.kind {
            Kind::Comment => return (out, replace),
            Kind::Str(_) => {
                // `${...}` being typed inside a string.
                let inner = &text[t.start as usize..offset as usize];
                let Some(open) = inner.rfind("${") else { return (out, replace) };
                if inner[open..].contains('}') {
                    return (out, replace);
                }
                replace.start = t.start + open as u32 + 2;
                let stages = world.stages_at(file, offset).map_or(Stages::ALL, |s| s.0);
                facts(&mut out, stages, false);
                for d in world.decls.iter().filter(|d| d.kind == DeclKind::Var) {
                    if !out.iter().any(|x| x.label == format!("var.{}", d.name)) {
                        out.push(c(
                            &format!("var.{}", d.name),
                            CompletionKind::Name(DeclKind::Var),
                            "variable".into(),
                            d.detail.clone(),
                        ));
                    }
                }
                return (out, replace);
            }
            _ => replace.start = t.start,
        }
    }
    let prev = a.word(a.prev);
    let typed = &text[replace.start as usize..offset as usize];
    // Top level.
    if !a.inside_block {
        if a.head.first() == Some(&"require") {
            for (cap, what) in schema::CAPABILITIES {
                out.push(c(&format!("\"{cap}\""), CompletionKind::Value, "capability".into(), what.to_string()));
            }
        } else if prev == "on" {
            for st in Stage::ALL {
                out.push(c(st.name(), CompletionKind::Stage, "stage".into(), String::new()));
            }
        } else if a.stmt_start {
            for k in syntax::TOP_KEYWORDS {
                out.push(c(k, CompletionKind::Keyword, "declaration".into(), String::new()));
            }
        } else if prev == "=" && matches!(a.head.first(), Some(&"table")) {
            for (k, _, _, doc) in schema::TABLE_KINDS {
                out.push(c(k, CompletionKind::Value, "table kind".into(), doc.to_string()));
            }
        } else if prev == "=" && matches!(a.head.first(), Some(&"list")) {
            for k in ["domains", "cidr", "strings"] {
                out.push(c(k, CompletionKind::Keyword, "list kind".into(), String::new()));
            }
        }
        return (out, replace);
    }
    // Settings blocks.
    let settings = settings_for(&a.head);
    if !settings.is_empty() {
        if a.stmt_start {
            for o in &settings {
                out.push(c(o.name, CompletionKind::Setting, opt_ty(o.ty), o.describe()));
            }
        } else if let Some(o) = settings.iter().find(|o| o.name == prev) {
            match o.ty {
                OptTy::List => names(&mut out, &[DeclKind::List]),
                OptTy::Table => names(&mut out, &[DeclKind::Table]),
                OptTy::Secret => names(&mut out, &[DeclKind::Secret]),
                OptTy::Bool => {
                    for w in ["true", "false"] {
                        out.push(c(w, CompletionKind::Value, String::new(), String::new()));
                    }
                }
                OptTy::Word(ws) => {
                    for w in ws {
                        out.push(c(w, CompletionKind::Value, String::new(), String::new()));
                    }
                }
                _ => {}
            }
        }
        return (out, replace);
    }
    // Stage and rules blocks.
    let stages = world.stages_at(file, offset).map_or(Stages::ALL, |s| s.0);
    if typed.starts_with("var.") {
        names(&mut out, &[DeclKind::Var]);
        for x in &mut out {
            x.label = format!("var.{}", x.label);
        }
        return (out, replace);
    }
    match prev {
        "in" => names(&mut out, &[DeclKind::List, DeclKind::Table]),
        "expand" => names(&mut out, &[DeclKind::Table, DeclKind::MailingList]),
        "lookup" | "access" | "login_mismatch" => names(&mut out, &[DeclKind::Table]),
        "score" => names(&mut out, &[DeclKind::Scanner]),
        "use" => names(&mut out, &[DeclKind::Rules]),
        ":auth" => names(&mut out, &[DeclKind::Secret]),
        "flag" | "unset" | "set" => names(&mut out, &[DeclKind::Var]),
        "deliver" | "filter" => {
            for w in ["mx", "smtp", "lmtp", "maildir", "mbox"] {
                out.push(c(w, CompletionKind::Keyword, "transport".into(), String::new()));
            }
        }
        "rewrite" => {
            for w in ["sender", "recipient"] {
                out.push(c(w, CompletionKind::Keyword, String::new(), String::new()));
            }
            names(&mut out, &[]);
        }
        "rate" => {
            for w in ["connections", "messages", "recipients", "errors", "auth_failures", "bounces"] {
                out.push(c(w, CompletionKind::Keyword, "counter".into(), String::new()));
            }
        }
        "by" => {
            for f in crate::check::RATE_KEYS {
                if f.info().stages.contains_all(stages) {
                    out.push(c(f.info().name, CompletionKind::Fact, f.info().ty.name().into(), f.info().doc.into()));
                }
            }
        }
        _ if a.word(a.prev2) == "dsn" || prev == "dsn" => {
            for w in ["notify never", "deny success", "ret headers"] {
                out.push(c(w, CompletionKind::Keyword, String::new(), String::new()));
            }
        }
        _ if a.stmt_start => {
            for (name, st, _) in ACTIONS {
                if st.contains_all(stages) {
                    out.push(c(
                        name,
                        CompletionKind::Action,
                        format!("action ({})", stages_text(*st)),
                        action_hover(name).unwrap_or_default(),
                    ));
                }
            }
            for k in ["if", "use"] {
                out.push(c(k, CompletionKind::Keyword, String::new(), String::new()));
            }
            if prev == "}" {
                for k in ["elsif", "else"] {
                    out.push(c(k, CompletionKind::Keyword, String::new(), String::new()));
                }
            }
        }
        _ if a.in_condition() => {
            facts(&mut out, stages, true);
            for (name, st, _) in TEST_STAGES {
                if st.contains_all(stages) {
                    let cap = test_capability(name).map(|c| format!(", needs \"{c}\"")).unwrap_or_default();
                    out.push(c(name, CompletionKind::Test, format!("test{cap}"), test_hover(name).unwrap_or_default()));
                }
            }
            for k in ["not", "allof", "anyof"] {
                out.push(c(k, CompletionKind::Keyword, String::new(), String::new()));
            }
        }
        _ => {
            // After a value: what compares it.
            let ty = Fact::from_name(prev).map(|f| f.info().ty);
            let ops: &[&str] = match ty {
                Some(Ty::Bool) => &["and", "or"],
                Some(Ty::Ip) => &["in", "not in"],
                Some(Ty::Num | Ty::Size | Ty::Duration) => &["==", "!=", "<", "<=", ">", ">="],
                Some(Ty::Str | Ty::List) => {
                    &[":is", ":contains", ":matches", ":regex", "in", "not in", "is null", "is not null"]
                }
                None => &[],
            };
            for o in ops {
                out.push(c(o, CompletionKind::Keyword, "operator".into(), String::new()));
            }
            if ops.is_empty() {
                facts(&mut out, stages, true);
            }
        }
    }
    (out, replace)
}

fn facts(out: &mut Vec<Completion>, stages: Stages, with_bool: bool) {
    for f in Fact::ALL {
        let i = f.info();
        if i.stages.contains_all(stages) && (with_bool || i.ty != Ty::Bool) {
            let cap = i.capability.map(|c| format!(", needs \"{c}\"")).unwrap_or_default();
            out.push(Completion {
                label: i.name.to_string(),
                kind: CompletionKind::Fact,
                detail: format!("{}{cap}", i.ty.name()),
                doc: fact_hover(*f),
            });
        }
    }
}

/// An entry of a document's outline.
#[derive(Clone, Debug)]
pub struct Symbol {
    pub name: String,
    /// `list`, `table`, `stage`, `rules`, `server`, `listener`, `setting`, `require`, ...
    pub kind: &'static str,
    pub detail: String,
    pub span: Span,
    pub selection: Span,
    pub children: Vec<Symbol>,
}

/// The outline of `file`: its declarations and blocks, settings under their block.
pub fn symbols(world: &World, file: FileId) -> Vec<Symbol> {
    let mut out = Vec::new();
    for (f, item) in &world.items {
        if *f != file {
            continue;
        }
        let sym = |name: String, kind, span: Span, selection: Span, children| Symbol {
            detail: world.first_line(span),
            name,
            kind,
            span,
            selection,
            children,
        };
        let settings = |options: &[Opt]| -> Vec<Symbol> {
            options.iter().map(|o| sym(o.name.name.clone(), "setting", o.span, o.name.span, Vec::new())).collect()
        };
        out.push(match item {
            Item::Require { span, .. } => sym("require".into(), "require", *span, *span, Vec::new()),
            Item::Include { path, span } => {
                sym(format!("include {}", unescape(&path.raw)), "include", *span, path.span, Vec::new())
            }
            Item::List { name, span, .. } => sym(name.name.clone(), "list", *span, name.span, Vec::new()),
            Item::Resource { kw, name, options, span, .. } => {
                sym(name.name.clone(), kw.as_str(), *span, name.span, settings(options))
            }
            Item::Settings { name: Some(n), options, span, .. } => {
                sym(format!("listener {}", n.name), "listener", *span, n.span, settings(options))
            }
            Item::Settings { options, span, .. } => {
                sym("server".into(), "server", *span, Span { end: span.start + 6, ..*span }, settings(options))
            }
            Item::Rules { name, span, .. } => {
                sym(format!("rules {}", name.name), "rules", *span, name.span, Vec::new())
            }
            Item::Stage { stage, span, .. } => {
                let name =
                    if stage.name == "route" && world.sources.text(Span { end: span.start + 5, ..*span }) == "route" {
                        "route".to_string()
                    } else {
                        format!("on {}", stage.name)
                    };
                sym(name, "stage", *span, stage.span, Vec::new())
            }
        });
    }
    out
}

/// Whether the stages of `other` are all in `self`.
trait ContainsAll {
    fn contains_all(self, other: Stages) -> bool;
}

impl ContainsAll for Stages {
    fn contains_all(self, other: Stages) -> bool {
        self.0 & other.0 == other.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::MemLoader;

    fn world(text: &str) -> World {
        load("p.mailpolicy", &MemLoader::single("p.mailpolicy", text))
    }

    #[test]
    fn every_test_and_action_has_its_spec_row() {
        for (name, _) in TESTS {
            assert!(!test_rows(name).is_empty(), "spec section 9 has no row for test `{name}`");
            assert!(TEST_STAGES.iter().any(|t| t.0 == *name), "TEST_STAGES lacks `{name}`");
        }
        for (name, _, _) in ACTIONS {
            assert!(!action_rows(name).is_empty(), "spec section 10 has no row for action `{name}`");
        }
    }

    /// The stages completion offers a test in are the stages the checker accepts it in.
    #[test]
    fn test_stages_agree_with_the_checker() {
        let uses = [
            ("flag", "flag x"),
            ("header", "header \"subject\" :is \"x\""),
            ("lookup", "lookup t \"k\" :is \"x\""),
            ("rate", "rate connections by client.ip per 1m > 1"),
            ("concurrent", "concurrent by client.ip > 1"),
            ("score", "score s > 1"),
            ("dnsbl", "dnsbl \"zen.example.net\""),
            ("rhsbl", "rhsbl \"dbl.example.net\" \"example.com\""),
            ("resolvable", "resolvable \"example.com\""),
            ("fqdn", "fqdn \"example.com\""),
            ("batv", "batv valid"),
            ("callahead", "callahead"),
            ("greylist", "greylist"),
            ("login_mismatch", "login_mismatch t"),
        ];
        for (name, stages, _) in TEST_STAGES {
            let (_, example) = uses.iter().find(|u| u.0 == *name).expect("an example of every test");
            for st in Stage::ALL {
                let text = format!(
                    "require [\"dnsbl\", \"dns\", \"ratelimit\", \"batv\", \"callahead\", \"greylist\", \"spamscan\"];\ntable t = map \"t\";\nscanner s = spamd \"127.0.0.1:783\";\non connect {{ set x; }}\non {} {{\n  if {example} {{ log \"x\"; }}\n}}\n",
                    st.name()
                );
                let c = crate::compile("p.mailpolicy", &MemLoader::single("p.mailpolicy", &text));
                let stage_err = c.diagnostics.iter().any(|d| d.code == "mailc::stage");
                assert_eq!(!stage_err, stages.contains(st), "`{name}` in {}: {:?}", st.name(), c.diagnostics);
            }
        }
    }

    #[test]
    fn names_across_a_file() {
        let text = "list trusted = cidr [\"10.0.0.0/8\"];\nrules r { if client.ip in trusted { set inside; } }\non rcpt {\n  use r;\n  if flag inside { log \"${var.inside}\"; }\n}\n";
        let w = world(text);
        let at = |s: &str, n: usize| text.match_indices(s).nth(n).map(|(i, _)| i as u32 + 1).unwrap_or(0);
        assert_eq!(w.name_at(FileId(0), at("trusted", 1)), Some(("trusted".into(), false)));
        assert_eq!(w.references("trusted", false, true).len(), 2);
        assert_eq!(w.references("inside", true, true).len(), 3);
        assert_eq!(w.rule_stages.get("r"), Some(&Stages::one(Stage::Rcpt)));
        // In the rules block, completion knows the stage it is used in.
        let off = at("client.ip", 0);
        let (items, _) = complete(&w, FileId(0), off);
        assert!(items.iter().any(|c| c.label == "recipient.domain"), "rcpt facts offered");
        assert!(!items.iter().any(|c| c.label == "message.size"), "data facts not offered in rcpt");
    }

    #[test]
    fn hover_texts() {
        let text = "on data {\n  if header \"x\" :is \"y\" and message.size > 10M { reject; }\n}\n";
        let w = world(text);
        let h = |s: &str| {
            hover(&w, FileId(0), text.find(s).map(|i| i as u32 + 1).unwrap_or(0)).map(|h| h.0).unwrap_or_default()
        };
        assert!(h("header").contains("data and later"), "{}", h("header"));
        assert!(h("message.size").contains("a size"), "{}", h("message.size"));
        assert!(h("reject").contains("5xx"), "{}", h("reject"));
    }

    /// Hover, completion, names and the outline never panic on a policy cut anywhere.
    #[test]
    fn every_prefix_is_safe() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/check/clean_everything.mailpolicy");
        let all = std::fs::read_to_string(path).expect("read");
        let cuts: Vec<usize> = syntax::lex(&all).iter().map(|t| t.end as usize).step_by(7).collect();
        for i in cuts {
            let w = world(&all[..i]);
            let f = FileId(0);
            let _ = symbols(&w, f);
            for off in [0, i / 3, i / 2, i.saturating_sub(1), i] {
                let off = off as u32;
                let _ = hover(&w, f, off);
                let _ = complete(&w, f, off);
                let _ = w.name_at(f, off);
            }
        }
    }
}
