//! Checking and lowering in one pass: name resolution, stage typing, argument and reply
//! validation, warnings, and construction of the IR. All diagnostics of a run are collected;
//! the program is returned only when there is no error.

mod actions;
mod arguments;
mod catalogue;
mod conditions;
mod declarations;
mod settings;
mod statements;
mod values;

use arguments::ArgCursor;
use catalogue::usage;
pub use catalogue::{default_reply, ACTIONS, RATE_KEYS, TESTS};

use std::collections::HashMap;
use std::path::PathBuf;

use crate::ast::{self, Arg, Cond, Item, Op, Stmt, Value, ValueKind};
use crate::diag::{did_you_mean, Diagnostic};
use crate::ir::*;
use crate::parse;
use crate::resources::{
    LdapOptions, MailingListOptions, MilterOptions, Options, ScannerOptions, SqlOptions, TableOptions,
};
use crate::schema::{self, OptSpec, OptTy};
use crate::source::{FileId, Loader, SourceFile, SourceMap, Span};

/// The result of compiling a policy: its sources, every diagnostic, and the program when
/// there was no error.
pub struct Compilation {
    pub sources: SourceMap,
    pub diagnostics: Vec<Diagnostic>,
    pub program: Option<Program>,
}

impl Compilation {
    pub fn has_errors(&self) -> bool {
        self.diagnostics.iter().any(Diagnostic::is_error)
    }
}

/// Includes nested deeper than this are refused (a loop is reported as a cycle first).
pub const MAX_INCLUDE_DEPTH: usize = 16;
/// Interpolations and string literals longer than this are refused.
pub const MAX_STRING: usize = 4096;

/// Compile the policy at `entry` and everything it includes.
pub fn compile(entry: &str, loader: &dyn Loader) -> Compilation {
    let mut sources = SourceMap::default();
    let mut diags = Vec::new();
    let mut items = Vec::new();
    let mut unparsed = parse::Unparsed::default();
    let path = loader.resolve(entry, None);
    match loader.load(&path) {
        Ok(text) => {
            let id = sources.add(SourceFile::new(entry.to_string(), path.clone(), text));
            load_items(id, &mut sources, loader, &mut items, &mut diags, &mut vec![path], &mut unparsed);
        }
        Err(e) => {
            diags.push(Diagnostic::error("mailc::io", format!("cannot read {entry}: {e}")));
        }
    }
    // After syntax errors the checker still runs on what parsed; any other error of
    // loading (an unreadable include, a cycle, too deep a nesting) stops here.
    let syntax = diags.iter().any(|d| d.code == "mailc::syntax");
    if diags.iter().any(|d| d.is_error() && d.code != "mailc::syntax") {
        return Compilation { sources, diagnostics: diags, program: None };
    }
    let mut c = Checker::new(&sources);
    c.diags = diags;
    c.unparsed = unparsed;
    c.run(&items);
    let Checker { diags, prog, .. } = c;
    let mut diags = diags;
    if syntax {
        // What did not parse may use a name or end a stage: no "unused" or "unreachable".
        diags.retain(Diagnostic::is_error);
    }
    diags.sort_by_key(|d| (d.span.map(|s| (s.file, s.start)), d.severity));
    // A rules block is checked once per `use`: an error that does not depend on the stage
    // would otherwise be reported once for every use.
    let mut seen = std::collections::HashSet::new();
    diags.retain(|d| seen.insert((d.is_error(), d.code, d.span, d.message.clone())));
    let program = if diags.iter().any(Diagnostic::is_error) { None } else { Some(prog) };
    Compilation { sources, diagnostics: diags, program }
}

fn load_items(
    file: FileId,
    sources: &mut SourceMap,
    loader: &dyn Loader,
    out: &mut Vec<(FileId, Item)>,
    diags: &mut Vec<Diagnostic>,
    stack: &mut Vec<PathBuf>,
    unparsed: &mut parse::Unparsed,
) {
    let parsed = parse::parse_recovering(file, &sources.get(file).text);
    diags.extend(parsed.errors);
    unparsed.names.extend(parsed.unparsed.names);
    unparsed.require |= parsed.unparsed.require;
    unparsed.include |= parsed.unparsed.include;
    for item in parsed.file.items {
        if let Item::Include { path, span } = &item {
            let name = unescape_plain(&path.raw);
            let from = sources.get(file).path.clone();
            let target = loader.resolve(&name, Some(&from));
            if let Some(at) = stack.iter().position(|p| *p == target) {
                let chain: Vec<String> = stack[at..]
                    .iter()
                    .chain([&target])
                    .map(|p| p.file_name().map_or_else(|| p.display().to_string(), |n| n.to_string_lossy().into()))
                    .collect();
                diags.push(
                    Diagnostic::error("mailc::include", format!("include cycle: {}", chain.join(" -> ")))
                        .at(path.span)
                        .help("a file cannot include itself, directly or through another: remove one of the includes"),
                );
                continue;
            }
            if stack.len() >= MAX_INCLUDE_DEPTH {
                diags.push(
                    Diagnostic::error("mailc::limit", format!("includes nested deeper than {MAX_INCLUDE_DEPTH}"))
                        .at(*span),
                );
                continue;
            }
            if sources.find(&target).is_some() {
                // Already included elsewhere: its declarations are in; including twice would
                // only report duplicates.
                continue;
            }
            match loader.load(&target) {
                Ok(text) => {
                    // Standard-library modules keep their `std:` name in diagnostics.
                    let shown = if name.starts_with("std:") { name.clone() } else { target.display().to_string() };
                    let id = sources.add(SourceFile::new(shown, target.clone(), text));
                    stack.push(target);
                    load_items(id, sources, loader, out, diags, stack, unparsed);
                    stack.pop();
                }
                Err(e) => diags.push(
                    Diagnostic::error("mailc::include", format!("cannot read included file `{name}`: {e}"))
                        .at(path.span)
                        .help(match name.strip_prefix("std:") {
                            Some(module) => format!(
                                "`std:{module}` names a module of the standard library; looked for {}",
                                target.display()
                            ),
                            None => {
                                format!("the path is resolved relative to the including file: {}", target.display())
                            }
                        }),
                ),
            }
            continue;
        }
        out.push((file, item));
    }
}

fn unescape_plain(raw: &str) -> String {
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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SymKind {
    List(ListKind),
    Table,
    Secret,
    Scanner,
    MailingList,
    Rules,
}

impl SymKind {
    fn noun(self) -> &'static str {
        match self {
            SymKind::List(_) => "list",
            SymKind::Table => "table",
            SymKind::Secret => "secret",
            SymKind::Scanner => "scanner",
            SymKind::MailingList => "mailing list",
            SymKind::Rules => "rules block",
        }
    }
}

struct Sym {
    kind: SymKind,
    id: u32,
    span: Span,
    used: bool,
    /// Table kind (`map`, `ldap`, ...).
    detail: String,
}

struct VarInfo {
    id: VarId,
    /// Earliest stage that sets it, and where.
    first_set: Option<(Stage, Span)>,
    read: bool,
}

/// What a statement list does to control flow.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Flow {
    Continues,
    /// Always ends the stage.
    Ends,
}

struct Checker<'s> {
    sources: &'s SourceMap,
    diags: Vec<Diagnostic>,
    prog: Program,
    syms: HashMap<String, Sym>,
    caps: HashMap<String, (Span, bool)>,
    vars: HashMap<String, VarInfo>,
    rules: HashMap<String, Vec<Stmt>>,
    strings: HashMap<String, StrId>,
    /// Rules blocks being expanded, to refuse recursion.
    expanding: Vec<String>,
    /// Whether the code emitted so far in each stage always ends it.
    stage_ended: [Option<Span>; 10],
    /// Checking a rules block that no stage uses: it has no stage, so diagnostics that
    /// depend on one (stage typing, variables set elsewhere) are dropped.
    detached: bool,
    /// What declarations and statements that did not parse would have declared.
    unparsed: parse::Unparsed,
}

/// The stage a statement is checked in; `via` is the `use` that brought a rules block in.
#[derive(Clone, Copy)]
struct Ctx {
    stage: Stage,
    via: Option<Span>,
}

enum Term {
    Val(Val, Ty),
    Test(Expr),
}

impl<'s> Checker<'s> {
    fn new(sources: &'s SourceMap) -> Checker<'s> {
        let mut prog = Program::default();
        prog.stages = vec![Vec::new(); Stage::ALL.len()];
        prog.files = sources.files().map(|(_, f)| f.name.clone()).collect();
        Checker {
            sources,
            diags: Vec::new(),
            prog,
            syms: HashMap::new(),
            caps: HashMap::new(),
            vars: HashMap::new(),
            rules: HashMap::new(),
            strings: HashMap::new(),
            expanding: Vec::new(),
            stage_ended: [None; 10],
            detached: false,
            unparsed: parse::Unparsed::default(),
        }
    }

    fn err(&mut self, d: Diagnostic) {
        if self.detached
            && (d.code == "mailc::stage" || (d.code == "mailc::undefined" && d.message.ends_with("is never set")))
        {
            return;
        }
        self.diags.push(d);
    }

    fn intern(&mut self, s: &str) -> StrId {
        if let Some(id) = self.strings.get(s) {
            return *id;
        }
        let id = StrId(self.prog.strings.len() as u32);
        self.prog.strings.push(s.to_string());
        self.strings.insert(s.to_string(), id);
        id
    }

    fn loc(&mut self, span: Span) -> LocId {
        let (line, col) = self.sources.line_col(span);
        let id = LocId(self.prog.locs.len() as u32);
        self.prog.locs.push(Loc { file: span.file.0, line, col });
        id
    }

    fn text(&self, span: Span) -> &str {
        self.sources.text(span)
    }

    // ---- driver ---------------------------------------------------------------------

    fn run(&mut self, items: &[(FileId, Item)]) {
        for (_, item) in items {
            self.declare(item);
        }
        let mut saw_server = false;
        for (_, item) in items {
            match item {
                Item::Resource { kw, name, kind, source, options, .. } => {
                    self.resource(*kw, name, kind, source.as_ref(), options)
                }
                Item::Settings { kw, name, options, span } => {
                    self.settings(*kw, name.as_ref(), options, *span, &mut saw_server)
                }
                Item::List { name, kind, items, .. } => self.list(name, *kind, items),
                _ => {}
            }
        }
        // Each milter's answers are read as a pseudo-table `milter.NAME` (kind `milter`),
        // declared after every real table so their ids do not move.
        let milters: Vec<String> =
            self.prog.scanners.iter().filter(|s| s.kind == "milter").map(|s| s.name.clone()).collect();
        for name in milters {
            self.prog.tables.push(Resource {
                name: format!("milter.{name}"),
                kind: "milter".into(),
                source: None,
                options: Options::None,
            });
        }
        for (_, item) in items {
            if let Item::Resource { kw: ast::ResourceKw::MailingList, name, source, options, .. } = item {
                self.mailing_list(name, source.as_ref(), options, items);
            }
        }
        // Variables: who sets what, and from which stage.
        let stage_items: Vec<(Stage, &Vec<Stmt>)> = items
            .iter()
            .filter_map(|(_, it)| match it {
                Item::Stage { stage, body, .. } => Stage::from_name(&stage.name).map(|s| (s, body)),
                _ => None,
            })
            .collect();
        for (stage, body) in &stage_items {
            self.collect_sets(body, *stage, &mut Vec::new());
        }
        for (_, item) in items {
            if let Item::Stage { stage, body, span } = item {
                match Stage::from_name(&stage.name) {
                    Some(st) => self.stage_block(st, body, *span),
                    None => {
                        let names: Vec<&str> = Stage::ALL.iter().map(|s| s.name()).collect();
                        let mut d =
                            Diagnostic::error("mailc::unknown-stage", format!("there is no stage `{}`", stage.name))
                                .at(stage.span)
                                .label("unknown stage");
                        d = match did_you_mean(&stage.name, names.iter().copied()) {
                            Some(s) => d.help(format!("did you mean `{s}`?")),
                            None => d.help(format!("the stages are {}", names.join(", "))),
                        };
                        self.err(d);
                    }
                }
            }
        }
        self.check_unused_rules();
        self.prog.capabilities = {
            let mut c: Vec<String> = self.caps.keys().cloned().collect();
            c.sort();
            c
        };
        self.unused();
    }

    /// A rules block that no stage uses is still checked for everything that does not
    /// depend on the stage it would run in; the code it lowers to is thrown away.
    fn check_unused_rules(&mut self) {
        let mut unused: Vec<(Span, String)> = self
            .syms
            .iter()
            .filter(|(_, s)| s.kind == SymKind::Rules && !s.used)
            .map(|(n, s)| (s.span, n.clone()))
            .collect();
        unused.sort_by_key(|u| (u.0.file, u.0.start));
        let (exprs, patterns, locs) = (self.prog.exprs.len(), self.prog.patterns.len(), self.prog.locs.len());
        self.detached = true;
        for (_, name) in unused {
            // Checked already through another unused block that uses it.
            if self.syms.get(&name).is_some_and(|s| s.used) {
                continue;
            }
            let Some(body) = self.rules.get(&name).cloned() else {
                continue;
            };
            self.expanding.push(name);
            let ctx = Ctx { stage: Stage::Connect, via: None };
            self.stmts(&body, ctx, &mut Vec::new());
            self.expanding.pop();
        }
        self.detached = false;
        self.prog.exprs.truncate(exprs);
        self.prog.patterns.truncate(patterns);
        self.prog.locs.truncate(locs);
    }
}

fn check_var_name(c: &mut Checker, v: &str, span: Span) {
    if v.contains('.') {
        c.err(
            Diagnostic::error("mailc::arguments", format!("`{v}`: a variable name has no dots"))
                .at(span)
                .help("write `set internal;` and read it as `flag internal` or `${var.internal}`"),
        );
    }
}

fn utf8_len(first: u8) -> usize {
    match first {
        0x00..=0x7f => 1,
        0xc0..=0xdf => 2,
        0xe0..=0xef => 3,
        _ => 4,
    }
}

/// Escapes of a plain (non-template) string; error offset into the raw text.
fn unescape(raw: &str) -> Result<String, (usize, String)> {
    let mut out = String::new();
    let mut chars = raw.char_indices();
    while let Some((i, c)) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some((_, '"')) => out.push('"'),
                // In a pattern, keep regex escapes as they are.
                Some((_, n)) => {
                    out.push('\\');
                    out.push(n);
                }
                None => return Err((i, "a string cannot end with `\\`".into())),
            }
        } else {
            out.push(c);
        }
    }
    Ok(out)
}

fn glob_to_regex(glob: &str) -> String {
    let mut re = String::from("^");
    let mut chars = glob.chars();
    while let Some(c) = chars.next() {
        match c {
            '*' => re.push_str(".*"),
            '?' => re.push('.'),
            '\\' => {
                if let Some(n) = chars.next() {
                    re.push_str(&regex::escape(&n.to_string()));
                }
            }
            c => re.push_str(&regex::escape(&c.to_string())),
        }
    }
    re.push('$');
    re
}

fn describe_value(v: &Value) -> String {
    match &v.kind {
        ValueKind::Str(_) => "a string".into(),
        ValueKind::Num(_) => "a number".into(),
        ValueKind::Size(_) => "a size".into(),
        ValueKind::Duration(_) => "a duration".into(),
        ValueKind::Enh(..) => "an enhanced status code".into(),
        ValueKind::List(_) => "a list".into(),
        ValueKind::Path(p) => format!("`{p}`"),
    }
}

fn example_decl(what: &str, name: &str) -> String {
    match what {
        "table" => format!("table {name} = map \"/etc/mailpolicy/{name}\";"),
        "secret" => format!("secret {name} = env \"{}\";", name.to_ascii_uppercase()),
        "scanner" => format!("scanner {name} = rspamd \"http://127.0.0.1:11333\";"),
        "rules block" => format!("rules {name} {{ ... }}"),
        "mailing list" => format!("mailing_list {name} = newsletter \"{name}@example.com\" {{ ... }};"),
        _ => format!("list {name} = [\"...\"];"),
    }
}
