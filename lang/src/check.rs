//! Checking and lowering in one pass: name resolution, stage typing, argument and reply
//! validation, warnings, and construction of the IR. All diagnostics of a run are collected;
//! the program is returned only when there is no error.

use std::collections::HashMap;
use std::path::PathBuf;

use crate::ast::{self, Arg, Cond, Item, Op, Stmt, Value, ValueKind};
use crate::diag::{did_you_mean, Diagnostic};
use crate::ir::*;
use crate::parse;
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

    fn declare(&mut self, item: &Item) {
        let (name, kind, detail) = match item {
            Item::Require { caps, .. } => {
                for cap in caps {
                    let name = unescape_plain(&cap.raw);
                    if schema::CAPABILITIES.iter().any(|(c, _)| *c == name) {
                        self.caps.entry(name).or_insert((cap.span, false));
                    } else {
                        let mut d =
                            Diagnostic::error("mailc::require", format!("unknown capability \"{name}\"")).at(cap.span);
                        d = match did_you_mean(&name, schema::CAPABILITIES.iter().map(|(c, _)| *c)) {
                            Some(s) => d.help(format!("did you mean \"{s}\"?")),
                            None => d.help(format!(
                                "the capabilities are {}",
                                schema::CAPABILITIES
                                    .iter()
                                    .map(|(c, _)| format!("\"{c}\""))
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            )),
                        };
                        self.err(d);
                    }
                }
                return;
            }
            Item::List { name, kind, .. } => {
                let k = match kind {
                    ast::ListKind::Strings => ListKind::Strings,
                    ast::ListKind::Domains => ListKind::Domains,
                    ast::ListKind::Cidr => ListKind::Cidr,
                };
                (name, SymKind::List(k), String::new())
            }
            Item::Resource { kw, name, kind, .. } => (
                name,
                match kw {
                    ast::ResourceKw::Table => SymKind::Table,
                    ast::ResourceKw::Secret => SymKind::Secret,
                    ast::ResourceKw::Scanner => SymKind::Scanner,
                    ast::ResourceKw::MailingList => SymKind::MailingList,
                },
                kind.name.clone(),
            ),
            Item::Rules { name, body, .. } => {
                self.rules.insert(name.name.clone(), body.clone());
                (name, SymKind::Rules, String::new())
            }
            _ => return,
        };
        if let Some(prev) = self.syms.get(&name.name) {
            let d = Diagnostic::error("mailc::duplicate", format!("`{}` is declared twice", name.name))
                .at(name.span)
                .label("declared again here")
                .related(prev.span, "first declared here")
                .help("give one of them another name");
            self.err(d);
            return;
        }
        let id = match kind {
            SymKind::List(_) => {
                self.prog.lists.len() + self.syms.values().filter(|s| matches!(s.kind, SymKind::List(_))).count()
            }
            _ => self.syms.values().filter(|s| s.kind == kind).count(),
        };
        let id = match kind {
            SymKind::List(_) => id - self.prog.lists.len(),
            _ => id,
        };
        self.syms.insert(name.name.clone(), Sym { kind, id: id as u32, span: name.span, used: false, detail });
    }

    /// A network; one written with host bits set (`172.16.0.0/2`) is a warning naming
    /// the network it really is, since a typo in a prefix can trust the whole Internet.
    fn cidr(&mut self, s: &str, span: Span) -> Option<Cidr> {
        let c = Cidr::parse(s)?;
        let net = c.network();
        if net.addr != c.addr {
            let wide = if net.addr.is_ipv4() { net.prefix < 8 } else { net.prefix < 16 };
            self.err(
                Diagnostic::warning(
                    "mailc::cidr",
                    format!("\"{s}\" has host bits set: it is the network {}/{}", net.addr, net.prefix),
                )
                .at(span)
                .help(if wide {
                    format!(
                        "that network covers public address space: clients from all of it are trusted where this list is; did you mean a longer prefix, e.g. \"{}/{}\"?",
                        c.addr,
                        if c.addr.is_ipv4() { 24 } else { 64 }
                    )
                } else {
                    format!("write \"{}/{}\" if that is what you mean", net.addr, net.prefix)
                }),
            );
        }
        Some(c)
    }

    fn list(&mut self, name: &ast::Ident, kind: ast::ListKind, items: &[Value]) {
        let k = match kind {
            ast::ListKind::Strings => ListKind::Strings,
            ast::ListKind::Domains => ListKind::Domains,
            ast::ListKind::Cidr => ListKind::Cidr,
        };
        let mut list = List { name: name.name.clone(), kind: k, items: Vec::new(), nets: Vec::new() };
        for v in items {
            let s = match &v.kind {
                ValueKind::Str(s) => unescape_plain(&s.raw),
                ValueKind::Num(_) => self.text(v.span).to_string(),
                _ => continue,
            };
            match k {
                ListKind::Cidr => match self.cidr(&s, v.span) {
                    Some(c) => list.nets.push(c),
                    None => self.err(
                        Diagnostic::error("mailc::cidr", format!("\"{s}\" is not a network"))
                            .at(v.span)
                            .help("write an address or a network like \"192.0.2.0/24\" or \"2001:db8::/32\""),
                    ),
                },
                ListKind::Domains => {
                    if s.contains('@') || s.contains(' ') || s.is_empty() {
                        self
                            .err(Diagnostic::error("mailc::domain", format!("\"{s}\" is not a domain")).at(v.span).help(
                            "a domains list holds names like \"example.com\", or \".example.com\" for its subdomains",
                        ));
                    }
                    list.items.push(s.to_ascii_lowercase());
                }
                ListKind::Strings => list.items.push(s.to_ascii_lowercase()),
            }
        }
        // ids were handed out in declaration order; keep the vector aligned with them.
        if let Some(sym) = self.syms.get(&name.name) {
            if sym.span == name.span {
                self.prog.lists.push(list);
            }
        }
    }

    fn resource(
        &mut self,
        kw: ast::ResourceKw,
        name: &ast::Ident,
        kind: &ast::Ident,
        source: Option<&ast::StrLit>,
        options: &[ast::Opt],
    ) {
        let is_first = self.syms.get(&name.name).is_some_and(|s| s.span == name.span);
        let (specs, needs_source, kinds): (Vec<OptSpec>, Option<bool>, Vec<&str>) = match kw {
            ast::ResourceKw::Table => {
                let found = schema::TABLE_KINDS.iter().find(|(k, ..)| *k == kind.name);
                let mut specs = schema::TABLE_COMMON.to_vec();
                if let Some((_, _, extra, _)) = found {
                    specs.extend_from_slice(extra);
                }
                (specs, found.map(|(_, s, ..)| *s), schema::TABLE_KINDS.iter().map(|(k, ..)| *k).collect())
            }
            ast::ResourceKw::Secret => {
                let found = schema::SECRET_KINDS.iter().any(|(k, _)| *k == kind.name);
                (Vec::new(), found.then_some(true), schema::SECRET_KINDS.iter().map(|(k, _)| *k).collect())
            }
            ast::ResourceKw::Scanner => {
                let found = schema::SCANNER_KINDS.iter().any(|(k, _)| *k == kind.name);
                (
                    schema::SCANNER.to_vec(),
                    found.then_some(true),
                    schema::SCANNER_KINDS.iter().map(|(k, _)| *k).collect(),
                )
            }
            ast::ResourceKw::MailingList => {
                let found = schema::MAILING_LIST_KINDS.iter().any(|(k, _)| *k == kind.name);
                (
                    schema::MAILING_LIST.to_vec(),
                    found.then_some(true),
                    schema::MAILING_LIST_KINDS.iter().map(|(k, _)| *k).collect(),
                )
            }
        };
        match needs_source {
            None => {
                let mut d =
                    Diagnostic::error("mailc::kind", format!("there is no {} kind `{}`", kw.as_str(), kind.name))
                        .at(kind.span);
                d = match did_you_mean(&kind.name, kinds.iter().copied()) {
                    Some(s) => d.help(format!("did you mean `{s}`?")),
                    None => d.help(format!("the {} kinds are {}", kw.as_str(), kinds.join(", "))),
                };
                self.err(d);
            }
            Some(true) if source.is_none() => self.err(
                Diagnostic::error(
                    "mailc::arguments",
                    format!("a `{}` {} needs a source string", kind.name, kw.as_str()),
                )
                .at(kind.span)
                .help(format!("for example: {} {} = {} \"...\";", kw.as_str(), name.name, kind.name)),
            ),
            Some(false) if source.is_some() => self.err(
                Diagnostic::error(
                    "mailc::arguments",
                    format!("a `{}` table takes its settings in a block, not a source string", kind.name),
                )
                .at(source.map(|s| s.span).unwrap_or(kind.span))
                .help(format!("table {} = {} {{ url \"...\"; ... }};", name.name, kind.name)),
            ),
            _ => {}
        }
        let opts = self.options(&specs, options, &format!("a `{}` {}", kind.name, kw.as_str()));
        if kind.name == "ldap" || kind.name == "sql" {
            let required: &[&str] = if kind.name == "ldap" { &["url", "base", "filter"] } else { &["url", "query"] };
            for r in required {
                if !opts.iter().any(|(n, _)| n == r) {
                    self.err(
                        Diagnostic::error(
                            "mailc::setting",
                            format!("the `{}` table `{}` needs `{r}`", kind.name, name.name),
                        )
                        .at(name.span)
                        .help(format!("add `{r} \"...\";` to its block")),
                    );
                }
            }
        }
        if !is_first {
            return;
        }
        let res = Resource {
            name: name.name.clone(),
            kind: kind.name.clone(),
            source: source.map(|s| unescape_plain(&s.raw)),
            options: opts,
        };
        match kw {
            ast::ResourceKw::Table => self.prog.tables.push(res),
            ast::ResourceKw::Secret => self.prog.secrets.push(res),
            ast::ResourceKw::Scanner => self.prog.scanners.push(res),
            ast::ResourceKw::MailingList => self.prog.mailing_lists.push(res),
        }
    }

    /// What a mailing list needs beyond its settings' types (spec/language.md 4.9): an
    /// address, the four required settings, a subscribers table the daemon can enumerate
    /// and change (a `list` file, or `sql` with `members`, `insert` and `delete`), an
    /// http(s) `web` URL.
    fn mailing_list(
        &mut self,
        name: &ast::Ident,
        source: Option<&ast::StrLit>,
        options: &[ast::Opt],
        items: &[(FileId, Item)],
    ) {
        let opts: Vec<(String, OptValue)> =
            self.prog.mailing_lists.iter().find(|l| l.name == name.name).map(|l| l.options.clone()).unwrap_or_default();
        if let Some(src) = source {
            let a = unescape_plain(&src.raw);
            let (local, domain) = crate::address::split(&a);
            if local.is_empty() || domain.is_empty() || !a.contains('@') || a.contains(' ') || local.contains('+') {
                self.err(
                    Diagnostic::error("mailc::arguments", format!("\"{a}\" is not a list address"))
                        .at(src.span)
                        .help("a list's address is local@domain without `+`, e.g. \"news@example.com\""),
                );
            }
        }
        for r in ["subscribers", "owner", "keys", "web"] {
            if !opts.iter().any(|(n, _)| n == r) && !options.iter().any(|o| o.name.name == r) {
                self.err(
                    Diagnostic::error("mailc::setting", format!("the mailing list `{}` needs `{r}`", name.name))
                        .at(name.span)
                        .help(match r {
                            "subscribers" => "add `subscribers TABLE;`: a `list` file table (one address per line) or an `sql` table",
                            "owner" => "add `owner \"editor@example.com\";`: the person who runs the list",
                            "keys" => "add `keys SECRET;`: a secret with `NUMBER KEY` lines that sign the unsubscribe and confirmation tokens",
                            _ => "add `web \"https://lists.example.com\";`: the public URL of the `http` listener",
                        }),
                );
            }
        }
        let at = |n: &str| options.iter().find(|o| o.name.name == n).map(|o| o.value.span).unwrap_or(name.span);
        if let Some(t) = options.iter().find(|o| o.name.name == "subscribers").and_then(|o| match &o.value.kind {
            ValueKind::Path(p) => Some(p.clone()),
            _ => None,
        }) {
            let kind = self.syms.get(&t).filter(|s| s.kind == SymKind::Table).map(|s| s.detail.clone());
            match kind.as_deref() {
                Some("list") | None => {}
                Some("sql") => {
                    let sql: Vec<String> = items
                        .iter()
                        .find_map(|(_, it)| match it {
                            Item::Resource { kw: ast::ResourceKw::Table, name: n, options: o, .. } if n.name == t => {
                                Some(o.iter().map(|x| x.name.name.clone()).collect())
                            }
                            _ => None,
                        })
                        .unwrap_or_default();
                    for q in ["members", "insert", "delete"] {
                        if !sql.iter().any(|n| n == q) {
                            self.err(
                                Diagnostic::error(
                                    "mailc::setting",
                                    format!("the sql table `{t}` holds the subscribers of `{}` but has no `{q}`", name.name),
                                )
                                .at(at("subscribers"))
                                .help(match q {
                                    "members" => "add `members \"SELECT address FROM subscribers WHERE list = 'news'\";`",
                                    "insert" => "add `insert \"INSERT INTO subscribers (list, address) VALUES ('news', $1) ON CONFLICT DO NOTHING\";`",
                                    _ => "add `delete \"DELETE FROM subscribers WHERE list = 'news' AND address = $1\";`",
                                }),
                            );
                        }
                    }
                }
                Some(other) => self.err(
                    Diagnostic::error(
                        "mailc::type",
                        format!("`{t}` is a `{other}` table; a mailing list's subscribers are a `list` file or an `sql` table"),
                    )
                    .at(at("subscribers"))
                    .help("the daemon lists, adds and removes subscribers: `table subscribers = list \"news.subscribers\";`"),
                ),
            }
        }
        if let Some((_, OptValue::Str(w))) = opts.iter().find(|(n, _)| n == "web") {
            let ok = (w.starts_with("https://") || w.starts_with("http://"))
                && w.split("://").nth(1).is_some_and(|h| !h.is_empty() && !h.contains(char::is_whitespace));
            if !ok {
                self.err(
                    Diagnostic::error("mailc::setting", format!("\"{w}\" is not an http(s) URL"))
                        .at(at("web"))
                        .help("write the public URL of the `http` listener, e.g. \"https://lists.example.com\""),
                );
            } else if !w.starts_with("https://") {
                self.err(
                    Diagnostic::warning("mailc::setting", format!("\"{w}\" is not HTTPS"))
                        .at(at("web"))
                        .help("RFC 8058 one-click unsubscribe needs an https:// URL: mail clients ignore plain http"),
                );
            }
        }
        if let Some((_, OptValue::Num(n))) = opts.iter().find(|(n, _)| n == "bounce_limit") {
            if *n < 1.0 || n.fract() != 0.0 {
                self.err(
                    Diagnostic::error("mailc::setting", "`bounce_limit` is a whole number of at least 1")
                        .at(at("bounce_limit")),
                );
            }
        }
    }

    fn settings(
        &mut self,
        kw: ast::SettingsKw,
        name: Option<&ast::Ident>,
        options: &[ast::Opt],
        span: Span,
        saw_server: &mut bool,
    ) {
        match kw {
            ast::SettingsKw::Server => {
                if let Some(n) = name {
                    self.err(
                        Diagnostic::error("mailc::syntax", "`server` takes no name")
                            .at(n.span)
                            .help("write `server { ... }`"),
                    );
                }
                if *saw_server {
                    self.err(
                        Diagnostic::error("mailc::duplicate", "a second `server` block")
                            .at(span)
                            .help("put all server settings in one block"),
                    );
                }
                *saw_server = true;
                let opts = self.options(schema::SERVER, options, "`server`");
                self.prog.server = Settings { name: None, options: opts };
            }
            ast::SettingsKw::Listener => {
                let Some(n) = name else {
                    self.err(
                        Diagnostic::error("mailc::syntax", "a listener needs a name")
                            .at(span)
                            .help("write `listener mx { address \"0.0.0.0:25\"; }`"),
                    );
                    return;
                };
                if self.prog.listeners.iter().any(|l| l.name.as_deref() == Some(n.name.as_str())) {
                    self.err(
                        Diagnostic::error("mailc::duplicate", format!("listener `{}` is declared twice", n.name))
                            .at(n.span),
                    );
                }
                let opts = self.options(schema::LISTENER, options, "a listener");
                match opts.iter().find(|(k, _)| k == "address") {
                    None => self.err(
                        Diagnostic::error("mailc::setting", format!("listener `{}` has no address", n.name))
                            .at(n.span)
                            .help("add `address \"0.0.0.0:25\";`"),
                    ),
                    Some((_, OptValue::Str(a))) if a.parse::<std::net::SocketAddr>().is_err() => {
                        let at =
                            options.iter().find(|o| o.name.name == "address").map(|o| o.value.span).unwrap_or(n.span);
                        self.err(
                            Diagnostic::error("mailc::setting", format!("\"{a}\" is not an IP:port address"))
                                .at(at)
                                .help("write \"0.0.0.0:25\", \"127.0.0.1:2525\" or \"[::]:587\""),
                        );
                    }
                    _ => {}
                }
                let has = |k: &str| opts.iter().any(|(n, _)| n == k);
                if has("cert") != has("key") {
                    self.err(
                        Diagnostic::error("mailc::setting", format!("listener `{}` sets only one of `cert` and `key`", n.name))
                            .at(n.span)
                            .help("give both the certificate chain and its private key, or neither (a self-signed pair is made)"),
                    );
                }
                // AUTH needs logins to check: `auth` other than `none` (submission and
                // submissions default to `required`) without `credentials` would refuse
                // every MAIL with 530.
                let word = |k: &str| match opts.iter().find(|(n, _)| n == k) {
                    Some((_, OptValue::Word(w))) => Some(w.clone()),
                    _ => None,
                };
                let protocol = word("protocol").unwrap_or_else(|| "smtp".into());
                let default_auth = if protocol == "smtp" || protocol == "http" { "none" } else { "required" };
                let auth = word("auth").unwrap_or_else(|| default_auth.into());
                if auth != "none" && !has("credentials") {
                    self.err(
                        Diagnostic::error("mailc::setting", format!("listener `{}` offers AUTH but has no `credentials`", n.name))
                            .at(n.span)
                            .help(if word("auth").is_some() {
                                "add `credentials TABLE;` (a map of login -> `mailc hash-password` verifier), or say `auth none;`".to_string()
                            } else {
                                format!("a {protocol} listener requires AUTH by default: add `credentials TABLE;`, or say `auth none;`")
                            }),
                    );
                }
                self.prog.listeners.push(Settings { name: Some(n.name.clone()), options: opts });
            }
        }
    }

    fn options(&mut self, specs: &[OptSpec], options: &[ast::Opt], what: &str) -> Vec<(String, OptValue)> {
        let mut out: Vec<(String, OptValue)> = Vec::new();
        let mut seen: HashMap<&str, Span> = HashMap::new();
        for opt in options {
            let Some(spec) = specs.iter().find(|s| s.name == opt.name.name) else {
                let mut d = Diagnostic::error("mailc::setting", format!("{what} has no setting `{}`", opt.name.name))
                    .at(opt.name.span);
                d = match did_you_mean(&opt.name.name, specs.iter().map(|s| s.name)) {
                    Some(s) => d.help(format!("did you mean `{s}`?")),
                    None if specs.is_empty() => d.help(format!("{what} takes no settings")),
                    None => d.help(format!(
                        "the settings are {}",
                        specs.iter().map(|s| s.name).collect::<Vec<_>>().join(", ")
                    )),
                };
                self.err(d);
                continue;
            };
            if let Some(prev) = seen.insert(spec.name, opt.name.span) {
                self.err(
                    Diagnostic::error("mailc::duplicate", format!("`{}` is set twice", spec.name))
                        .at(opt.name.span)
                        .related(prev, "first set here"),
                );
                continue;
            }
            if let Some(v) = self.opt_value(spec, &opt.value) {
                out.push((spec.name.to_string(), v));
            }
        }
        out
    }

    fn opt_value(&mut self, spec: &OptSpec, v: &Value) -> Option<OptValue> {
        let bad = |this: &mut Self, want: &str| {
            this.err(
                Diagnostic::error("mailc::type", format!("`{}` takes {want}", spec.name))
                    .at(v.span)
                    .label(format!("found {}", describe_value(v)))
                    .help(spec.doc.to_string()),
            );
            None
        };
        match (spec.ty, &v.kind) {
            (OptTy::Str, ValueKind::Str(s)) => Some(OptValue::Str(unescape_plain(&s.raw))),
            (OptTy::Str, _) => bad(self, "a string"),
            (OptTy::Num, ValueKind::Num(n)) => Some(OptValue::Num(*n)),
            (OptTy::Num, _) => bad(self, "a number"),
            (OptTy::Size, ValueKind::Size(n)) => Some(OptValue::Size(*n)),
            (OptTy::Size, ValueKind::Num(n)) => Some(OptValue::Size(*n as u64)),
            (OptTy::Size, ValueKind::Duration(_)) => {
                self.err(
                    Diagnostic::error("mailc::type", format!("`{}` takes a size, not a duration", spec.name))
                        .at(v.span)
                        .help("sizes use upper-case K, M and G (`10M`); lower-case `m` means minutes"),
                );
                None
            }
            (OptTy::Size, _) => bad(self, "a size such as 10M"),
            (OptTy::Duration, ValueKind::Duration(n)) => Some(OptValue::Duration(*n)),
            (OptTy::Duration, ValueKind::Size(_)) => {
                self.err(
                    Diagnostic::error("mailc::type", format!("`{}` takes a duration, not a size", spec.name))
                        .at(v.span)
                        .help("durations use ms, s, m, h, d and w (`5m`); upper-case M means megabytes"),
                );
                None
            }
            (OptTy::Duration, _) => bad(self, "a duration such as 30s or 5m"),
            (OptTy::Bool, ValueKind::Path(p)) if p == "true" || p == "false" => Some(OptValue::Bool(p == "true")),
            (OptTy::Bool, _) => bad(self, "`true` or `false`"),
            (OptTy::Word(words), ValueKind::Path(p)) if words.contains(&p.as_str()) => Some(OptValue::Word(p.clone())),
            (OptTy::Word(words), _) => bad(self, &format!("one of {}", words.join(", "))),
            (OptTy::Strings, ValueKind::List(items)) => Some(OptValue::List(
                items
                    .iter()
                    .filter_map(|i| if let ValueKind::Str(s) = &i.kind { Some(unescape_plain(&s.raw)) } else { None })
                    .collect(),
            )),
            (OptTy::Strings, _) => bad(self, "a list of strings"),
            (OptTy::Secret | OptTy::Table | OptTy::List, ValueKind::Path(p)) => {
                let want = match spec.ty {
                    OptTy::Secret => "secret",
                    OptTy::Table => "table",
                    _ => "list",
                };
                match self.syms.get_mut(p) {
                    Some(sym) if sym.kind.noun() == want => {
                        sym.used = true;
                        let id = sym.id;
                        Some(match spec.ty {
                            OptTy::Secret => OptValue::Secret(SecretId(id)),
                            OptTy::Table => OptValue::Table(TableId(id)),
                            _ => OptValue::ListRef(ListId(id)),
                        })
                    }
                    Some(sym) => {
                        let noun = sym.kind.noun();
                        self.err(
                            Diagnostic::error(
                                "mailc::type",
                                format!("`{p}` is a {noun}, but `{}` takes a {want}", spec.name),
                            )
                            .at(v.span),
                        );
                        None
                    }
                    None => {
                        self.undefined(p, v.span, Some(want));
                        None
                    }
                }
            }
            (OptTy::Secret, _) => bad(self, "the name of a secret"),
            (OptTy::Table, _) => bad(self, "the name of a table"),
            (OptTy::List, _) => bad(self, "the name of a list"),
        }
    }

    fn undefined(&mut self, name: &str, span: Span, want: Option<&str>) {
        if self.unparsed.include || self.unparsed.names.contains(name) {
            return;
        }
        let what = want.unwrap_or("list or table");
        let cands: Vec<&str> = self
            .syms
            .iter()
            .filter(|(_, s)| want.is_none_or(|w| s.kind.noun() == w))
            .map(|(n, _)| n.as_str())
            .collect();
        let mut d =
            Diagnostic::error("mailc::undefined", format!("no {what} named `{name}`")).at(span).label("not declared");
        d = match did_you_mean(name, cands) {
            Some(s) => d.help(format!("did you mean `{s}`?")),
            None => d.help(format!("declare it first, e.g. `{}`", example_decl(what, name))),
        };
        self.err(d);
    }

    fn use_sym(&mut self, name: &str, span: Span, want: &[&str]) -> Option<(SymKind, u32, String)> {
        match self.syms.get_mut(name) {
            Some(sym) if want.contains(&sym.kind.noun()) => {
                sym.used = true;
                Some((sym.kind, sym.id, sym.detail.clone()))
            }
            Some(sym) => {
                // It is referenced, if wrongly: one error, not also "never used".
                sym.used = true;
                let noun = sym.kind.noun();
                let sspan = sym.span;
                self.err(
                    Diagnostic::error(
                        "mailc::type",
                        format!("`{name}` is a {noun}; a {} is needed here", want.join(" or ")),
                    )
                    .at(span)
                    .related(sspan, "declared here"),
                );
                None
            }
            None => {
                self.undefined(name, span, if want.len() == 1 { Some(want[0]) } else { None });
                None
            }
        }
    }

    fn need_cap(&mut self, cap: &str, span: Span, what: &str) {
        match self.caps.get_mut(cap) {
            Some(c) => c.1 = true,
            None if self.unparsed.require => {}
            None => self.err(
                Diagnostic::error("mailc::require", format!("`{what}` needs the \"{cap}\" capability"))
                    .at(span)
                    .help(format!("add `require \"{cap}\";` at the top of the policy")),
            ),
        }
    }

    /// A declaration in a standard-library module (`include "std:..."`) that the policy does
    /// not use is no mistake of the policy's author: it is not reported.
    fn in_std(&self, span: Span) -> bool {
        self.sources.get(span.file).name.starts_with("std:")
    }

    fn unused(&mut self) {
        let mut unused: Vec<(Span, String, &'static str)> = self
            .syms
            .iter()
            .filter(|(_, s)| !s.used && !self.in_std(s.span))
            .map(|(n, s)| (s.span, n.clone(), s.kind.noun()))
            .collect();
        unused.sort_by_key(|u| (u.0.file, u.0.start));
        for (span, name, noun) in unused {
            self.diags.push(
                Diagnostic::warning("mailc::unused", format!("{noun} `{name}` is never used"))
                    .at(span)
                    .help("remove it, or use it in a rule"),
            );
        }
        let mut caps: Vec<(Span, String)> =
            self.caps.iter().filter(|(_, c)| !c.1 && !self.in_std(c.0)).map(|(n, c)| (c.0, n.clone())).collect();
        caps.sort_by_key(|c| (c.0.file, c.0.start));
        for (span, name) in caps {
            self.diags.push(
                Diagnostic::warning("mailc::unused", format!("capability \"{name}\" is required but never used"))
                    .at(span)
                    .help("remove it from `require`"),
            );
        }
        let mut vars: Vec<(Span, String)> = self
            .vars
            .iter()
            .filter(|(_, v)| !v.read)
            .filter_map(|(n, v)| v.first_set.map(|(_, s)| (s, n.clone())))
            .collect();
        vars.sort_by_key(|c| (c.0.file, c.0.start));
        for (span, name) in vars {
            self.diags.push(
                Diagnostic::warning("mailc::unused", format!("`{name}` is set but never read"))
                    .at(span)
                    .help(format!("test it with `flag {name}` or read it with `${{var.{name}}}`, or remove the `set`")),
            );
        }
    }

    // ---- variables ------------------------------------------------------------------

    fn collect_sets(&mut self, body: &[Stmt], stage: Stage, expanding: &mut Vec<String>) {
        for s in body {
            match s {
                Stmt::If { arms, otherwise, .. } => {
                    for (_, b) in arms {
                        self.collect_sets(b, stage, expanding);
                    }
                    if let Some(b) = otherwise {
                        self.collect_sets(b, stage, expanding);
                    }
                }
                Stmt::Action { name, args, .. } => {
                    if name.name == "set" {
                        if let Some(Arg::Value(Value { kind: ValueKind::Path(v), span })) = args.first() {
                            self.define_var(v, stage, *span);
                        }
                    } else if name.name == "use" {
                        if let Some(Arg::Value(Value { kind: ValueKind::Path(r), .. })) = args.first() {
                            if !expanding.contains(r) {
                                if let Some(body) = self.rules.get(r).cloned() {
                                    expanding.push(r.clone());
                                    self.collect_sets(&body, stage, expanding);
                                    expanding.pop();
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    fn define_var(&mut self, name: &str, stage: Stage, span: Span) {
        let next = VarId(self.vars.len() as u32);
        let scope = match stage {
            Stage::Connect | Stage::Helo | Stage::Auth => Scope::Session,
            Stage::Mail | Stage::Rcpt | Stage::Data => Scope::Transaction,
            _ => Scope::Message,
        };
        let v = self.vars.entry(name.to_string()).or_insert_with(|| VarInfo { id: next, first_set: None, read: false });
        if v.first_set.is_none_or(|(s, _)| stage < s) {
            v.first_set = Some((stage, span));
        }
        let id = v.id;
        if id.index() == self.prog.vars.len() {
            self.prog.vars.push(Var { name: name.to_string(), scope });
        } else if let Some(var) = self.prog.vars.get_mut(id.index()) {
            // A variable set in several stages lives as long as its earliest setter's scope.
            if (scope as u8) < (var.scope as u8) {
                var.scope = scope;
            }
        }
    }

    /// Read a variable in `ctx`: it must be set somewhere at or before this stage.
    fn read_var(&mut self, name: &str, span: Span, ctx: Ctx) -> Option<VarId> {
        let Some(v) = self.vars.get_mut(name) else {
            if self.unparsed.names.contains(name) {
                return None;
            }
            let cands: Vec<String> = self.vars.keys().cloned().collect();
            let mut d = Diagnostic::error("mailc::undefined", format!("`{name}` is never set"))
                .at(span)
                .label("no `set` for this name");
            d = match did_you_mean(name, cands.iter().map(String::as_str)) {
                Some(s) => d.help(format!("did you mean `{s}`?")),
                None => d.help(format!("set it in an earlier stage: `set {name};`")),
            };
            self.err(d);
            return None;
        };
        v.read = true;
        let id = v.id;
        if let Some((first, set_span)) = v.first_set {
            if first > ctx.stage {
                let d = Diagnostic::error("mailc::stage", format!("`{name}` is read in `{}` but first set in `{}`", ctx.stage.name(), first.name()))
                    .at(span)
                    .related(set_span, format!("set here, in `{}`", first.name()))
                    .help(format!("a variable can be read in the stage that sets it and in later stages; move the `set` to `{}` or earlier", ctx.stage.name()));
                self.err(self.via(d, ctx));
            }
        }
        Some(id)
    }

    fn via(&self, d: Diagnostic, ctx: Ctx) -> Diagnostic {
        match ctx.via {
            Some(s) => d.related(s, format!("used in `{}` here", ctx.stage.name())),
            None => d,
        }
    }

    // ---- stages and statements ----------------------------------------------------

    fn stage_block(&mut self, stage: Stage, body: &[Stmt], _span: Span) {
        if let Some(end) = self.stage_ended[stage.index()] {
            if let Some(first) = body.first() {
                self.diags.push(
                    Diagnostic::warning("mailc::unreachable", format!("this `{}` block never runs", stage.name()))
                        .at(first.span())
                        .related(end, "an earlier block of this stage always ends here")
                        .help("remove it, or make the earlier rule conditional"),
                );
            }
        }
        let mut code = std::mem::take(&mut self.prog.stages[stage.index()]);
        let flow = self.stmts(body, Ctx { stage, via: None }, &mut code);
        self.prog.stages[stage.index()] = code;
        if flow == Flow::Ends && self.stage_ended[stage.index()].is_none() {
            self.stage_ended[stage.index()] = body.last().map(Stmt::span);
        }
    }

    fn stmts(&mut self, body: &[Stmt], ctx: Ctx, code: &mut Vec<Instr>) -> Flow {
        let mut flow = Flow::Continues;
        let mut ended_at: Option<Span> = None;
        for s in body {
            if flow == Flow::Ends {
                if let Some(end) = ended_at {
                    self.diags.push(
                        Diagnostic::warning("mailc::unreachable", "this statement is never reached")
                            .at(s.span())
                            .related(end, "the stage always ends here")
                            .help("remove it, or move it before the action that ends the stage"),
                    );
                }
                ended_at = None; // warn once per block
                                 // Still check it, so its errors are reported too.
                let mut scratch = Vec::new();
                self.stmt(s, ctx, &mut scratch);
                continue;
            }
            if self.stmt(s, ctx, code) == Flow::Ends {
                flow = Flow::Ends;
                ended_at = Some(s.span());
            }
        }
        flow
    }

    fn stmt(&mut self, s: &Stmt, ctx: Ctx, code: &mut Vec<Instr>) -> Flow {
        match s {
            Stmt::If { arms, otherwise, .. } => {
                let mut exits = Vec::new();
                let mut all_end = true;
                for (cond, body) in arms {
                    let e = self.cond(cond, ctx);
                    let loc = self.loc(cond.span());
                    let at = code.len();
                    code.push(Instr::If { cond: e, else_pc: 0, loc });
                    if self.stmts(body, ctx, code) != Flow::Ends {
                        all_end = false;
                    }
                    exits.push(code.len());
                    code.push(Instr::Jump(0));
                    let next = code.len() as u32;
                    if let Instr::If { else_pc, .. } = &mut code[at] {
                        *else_pc = next;
                    }
                }
                match otherwise {
                    Some(b) => {
                        if self.stmts(b, ctx, code) != Flow::Ends {
                            all_end = false;
                        }
                    }
                    None => all_end = false,
                }
                let end = code.len() as u32;
                for e in exits {
                    code[e] = Instr::Jump(end);
                }
                if all_end {
                    Flow::Ends
                } else {
                    Flow::Continues
                }
            }
            Stmt::Action { name, args, span } => {
                if name.name == "use" {
                    return self.use_rules(args, *span, ctx, code);
                }
                match self.action(name, args, *span, ctx) {
                    Some(action) => {
                        let terminal = action.is_terminal();
                        let loc = self.loc(*span);
                        code.push(Instr::Do { action, loc });
                        if terminal {
                            Flow::Ends
                        } else {
                            Flow::Continues
                        }
                    }
                    None => Flow::Continues,
                }
            }
        }
    }

    fn use_rules(&mut self, args: &[Arg], span: Span, ctx: Ctx, code: &mut Vec<Instr>) -> Flow {
        let Some(Arg::Value(Value { kind: ValueKind::Path(name), span: nspan })) = args.first() else {
            self.err(
                Diagnostic::error("mailc::arguments", "`use` needs the name of a rules block")
                    .at(span)
                    .help("rules spam_checks { ... }  then  use spam_checks;"),
            );
            return Flow::Continues;
        };
        if args.len() > 1 {
            self.err(Diagnostic::error("mailc::arguments", "`use` takes one name").at(args[1].span()));
        }
        self.use_sym(name, *nspan, &["rules block"]);
        if self.expanding.contains(name) {
            self.err(
                Diagnostic::error("mailc::recursion", format!("rules block `{name}` uses itself"))
                    .at(*nspan)
                    .help("a rules block cannot use itself, directly or through another"),
            );
            return Flow::Continues;
        }
        let Some(body) = self.rules.get(name).cloned() else {
            return Flow::Continues;
        };
        self.expanding.push(name.clone());
        let flow = self.stmts(&body, Ctx { stage: ctx.stage, via: Some(ctx.via.unwrap_or(span)) }, code);
        self.expanding.pop();
        flow
    }

    // ---- conditions -------------------------------------------------------------------

    fn push_expr(&mut self, e: Expr) -> ExprId {
        self.prog.exprs.push(e);
        ExprId(self.prog.exprs.len() as u32 - 1)
    }

    fn cond(&mut self, c: &Cond, ctx: Ctx) -> ExprId {
        let e = self.cond_expr(c, ctx);
        self.push_expr(e)
    }

    fn cond_expr(&mut self, c: &Cond, ctx: Ctx) -> Expr {
        match c {
            Cond::Or(parts, _) => {
                let ids = parts.iter().map(|p| self.cond(p, ctx)).collect();
                Expr::Any(ids)
            }
            Cond::And(parts, _) => {
                let ids = parts.iter().map(|p| self.cond(p, ctx)).collect();
                Expr::All(ids)
            }
            Cond::Not(inner, _) => Expr::Not(self.cond(inner, ctx)),
            Cond::Test { term, op, operand, span } => self.test(term, *op, operand.as_ref(), *span, ctx),
        }
    }

    fn stage_check(&mut self, what: &str, available: Stages, span: Span, ctx: Ctx) -> bool {
        if available.contains(ctx.stage) {
            return true;
        }
        let first = available.first().unwrap_or(Stage::Connect);
        let msg = if available.iter().all(|s| s > ctx.stage) {
            format!("`{what}` does not exist yet in `{}`: it becomes available in `{}`", ctx.stage.name(), first.name())
        } else {
            format!("`{what}` is not available in `{}`: it exists in {}", ctx.stage.name(), available.describe())
        };
        let help = match (what, ctx.stage) {
            ("recipient" | "recipient.domain" | "recipient.local", Stage::Data) => {
                "in `data` there can be many recipients: test `recipients`, or move the rule to `on rcpt`".to_string()
            }
            _ => format!("move the rule to `on {}`", first.name()),
        };
        let d =
            Diagnostic::error("mailc::stage", msg).at(span).label(format!("used in `{}`", ctx.stage.name())).help(help);
        let d = self.via(d, ctx);
        self.err(d);
        false
    }

    /// A fact or variable named by a path (in a condition, an argument or `${}`).
    fn path_val(&mut self, path: &str, span: Span, ctx: Ctx) -> Option<(Val, Ty)> {
        if let Some(var) = path.strip_prefix("var.") {
            return self.read_var(var, span, ctx).map(|id| (Val::Var(id), Ty::Str));
        }
        if let Some(f) = Fact::from_name(path) {
            let info = f.info();
            if let Some(cap) = info.capability {
                self.need_cap(cap, span, info.name);
            }
            self.stage_check(info.name, info.stages, span, ctx);
            return Some((Val::Fact(f), info.ty));
        }
        None
    }

    fn unknown_term(&mut self, name: &str, span: Span) {
        if let Some(sym) = self.syms.get(name) {
            let hint = match sym.kind {
                SymKind::List(_) | SymKind::Table => {
                    format!("`{name}` is a {}: test membership with `VALUE in {name}`", sym.kind.noun())
                }
                _ => format!("`{name}` is a {} and cannot be tested", sym.kind.noun()),
            };
            self.err(Diagnostic::error("mailc::type", format!("`{name}` is not a test")).at(span).help(hint));
            return;
        }
        let mut cands: Vec<&str> = Fact::ALL.iter().map(|f| f.info().name).collect();
        cands.extend(TESTS.iter().map(|t| t.0));
        let mut d = Diagnostic::error("mailc::undefined", format!("unknown test or fact `{name}`"))
            .at(span)
            .label("not a fact or test");
        d = match did_you_mean(name, cands) {
            Some(s) => d.help(format!("did you mean `{s}`?")),
            None => d.help("spec/language.md lists every fact and test"),
        };
        self.err(d);
    }

    fn term(&mut self, t: &ast::Term, ctx: Ctx) -> Option<Term> {
        let name = t.name.name.as_str();
        let mut a = ArgCursor::new(&t.args, t.span);
        let out = match name {
            "flag" => {
                let (v, span) = a.word(self, "the name of a flag, e.g. `flag internal`")?;
                let id = self.read_var(&v, span, ctx)?;
                Term::Test(Expr::Flag(id))
            }
            "header" => {
                self.stage_check("header", Stages::from(Stage::Data), t.name.span, ctx);
                let (h, span) = a.plain_string(self, "a header name, e.g. `header \"subject\"`")?;
                if h.is_empty() || h.contains(':') || h.contains(char::is_whitespace) {
                    self.err(
                        Diagnostic::error("mailc::arguments", format!("\"{h}\" is not a header name"))
                            .at(span)
                            .help("write the field name without the colon, e.g. \"subject\""),
                    );
                }
                let id = self.intern(&h.to_ascii_lowercase());
                Term::Val(Val::Header(id), Ty::List)
            }
            "lookup" => {
                let (tname, tspan) = a.word(self, "a table name, e.g. `lookup access sender`")?;
                let (_, id, _) = self.use_sym(&tname, tspan, &["table"])?;
                let key = a.val(self, ctx, "the key to look up, e.g. `sender.domain`")?;
                Term::Val(Val::Lookup { table: TableId(id), key: Box::new(key.0) }, Ty::Str)
            }
            "rate" => {
                self.need_cap("ratelimit", t.name.span, "rate");
                let (cname, cspan) =
                    a.word(self, "what to count: connections, messages, bounces, recipients, errors or auth_failures")?;
                let Some(counter) = Counter::from_name(&cname) else {
                    let names = ["connections", "messages", "recipients", "errors", "auth_failures", "bounces"];
                    let mut d =
                        Diagnostic::error("mailc::arguments", format!("`rate` cannot count `{cname}`")).at(cspan);
                    d = match did_you_mean(&cname, names) {
                        Some(s) => d.help(format!("did you mean `{s}`?")),
                        None => d.help(format!("count one of {}", names.join(", "))),
                    };
                    self.err(d);
                    return None;
                };
                self.stage_check(&format!("rate {}", counter.name()), Stages::from(counter.first_stage()), cspan, ctx);
                a.keyword(self, "by", "rate messages by client.ip per 1m")?;
                let key_span = a.peek_value().map(|v| v.span).unwrap_or(t.span);
                let key = a.val(self, ctx, "what to count by, e.g. `client.ip` or `auth.user`")?;
                self.check_rate_key(&key.0, key_span);
                a.keyword(self, "per", "rate messages by client.ip per 1m")?;
                let window = a.duration(self, "a window such as 1m, 1h or 1d")?;
                if window.0 == 0 {
                    self.err(
                        Diagnostic::error("mailc::arguments", "the window of a rate must be longer than 0")
                            .at(window.1),
                    );
                }
                Term::Val(Val::Rate { counter, key: Box::new(key.0), window_ms: window.0 }, Ty::Num)
            }
            "concurrent" => {
                self.need_cap("ratelimit", t.name.span, "concurrent");
                a.keyword(self, "by", "concurrent by client.ip")?;
                let key_span = a.peek_value().map(|v| v.span).unwrap_or(t.span);
                let key = a.val(self, ctx, "what to count by, e.g. `client.ip`")?;
                // Sessions are counted under the client's address and network only (the host
                // opens and closes those keys); any other key would always count 0.
                if !matches!(key.0, Val::Fact(Fact::ClientIp | Fact::ClientNetwork)) {
                    self.err(
                        Diagnostic::error(
                            "mailc::arguments",
                            "concurrent sessions are counted per client address or network",
                        )
                        .at(key_span)
                        .help("count by `client.ip` or `client.network`"),
                    );
                }
                Term::Val(Val::Concurrent { key: Box::new(key.0) }, Ty::Num)
            }
            "score" => {
                self.need_cap("spamscan", t.name.span, "score");
                self.stage_check("score", Stages::from(Stage::Data), t.name.span, ctx);
                let (sname, sspan) = a.word(self, "a scanner name, e.g. `score rspamd`")?;
                let (_, id, _) = self.use_sym(&sname, sspan, &["scanner"])?;
                Term::Val(Val::Score(ScannerId(id)), Ty::Num)
            }
            "dnsbl" => {
                self.need_cap("dnsbl", t.name.span, "dnsbl");
                let (zone, zspan) = a.plain_string(self, "a DNS zone, e.g. `dnsbl \"zen.spamhaus.org\"`")?;
                self.check_zone(&zone, zspan);
                let returns = a.tag_strings(self, "returns")?;
                Term::Test(Expr::Dnsbl { zone: self.intern(&zone.to_ascii_lowercase()), returns })
            }
            "rhsbl" => {
                self.need_cap("dnsbl", t.name.span, "rhsbl");
                let (zone, zspan) =
                    a.plain_string(self, "a DNS zone, e.g. `rhsbl \"dbl.example.net\" sender.domain`")?;
                self.check_zone(&zone, zspan);
                let domain = match a.peek_value() {
                    Some(_) => a.val(self, ctx, "the domain to check")?.0,
                    None => {
                        self.stage_check("rhsbl (of sender.domain)", Stages::from(Stage::Mail), t.name.span, ctx);
                        Val::Fact(Fact::SenderDomain)
                    }
                };
                let returns = a.tag_strings(self, "returns")?;
                Term::Test(Expr::Rhsbl { zone: self.intern(&zone.to_ascii_lowercase()), domain, returns })
            }
            "resolvable" => {
                self.need_cap("dns", t.name.span, "resolvable");
                let v = a.val(self, ctx, "a domain, e.g. `resolvable sender.domain`")?;
                Term::Test(Expr::Resolvable(v.0))
            }
            "fqdn" => {
                let v = a.val(self, ctx, "a name, e.g. `fqdn helo.name`")?;
                Term::Test(Expr::Fqdn(v.0))
            }
            "batv" => {
                self.need_cap("batv", t.name.span, "batv");
                a.keyword(self, "valid", "batv valid")?;
                self.stage_check("batv valid", Stages::from(Stage::Rcpt), t.name.span, ctx);
                Term::Test(Expr::BatvValid)
            }
            "callahead" => {
                self.need_cap("callahead", t.name.span, "callahead");
                self.stage_check("callahead", Stages::one(Stage::Rcpt), t.name.span, ctx);
                Term::Test(Expr::Callahead)
            }
            "greylist" => {
                self.need_cap("greylist", t.name.span, "greylist");
                self.stage_check("greylist", Stages::range(Stage::Rcpt, Stage::Data), t.name.span, ctx);
                let delay = a.tag_duration(self, "delay")?.unwrap_or(300_000);
                let expire = a.tag_duration(self, "expire")?.unwrap_or(35 * 86_400_000);
                Term::Test(Expr::Greylist { delay_ms: delay, expire_ms: expire })
            }
            "login_mismatch" => {
                self.stage_check("login_mismatch", Stages::from(Stage::Mail), t.name.span, ctx);
                let (tname, tspan) = a.word(self, "a table of sender -> login, e.g. `login_mismatch sender_logins`")?;
                let (_, id, _) = self.use_sym(&tname, tspan, &["table"])?;
                Term::Test(Expr::LoginMismatch(TableId(id)))
            }
            _ => {
                let Some((val, ty)) = self.path_val(name, t.name.span, ctx) else {
                    if !name.starts_with("var.") {
                        self.unknown_term(name, t.name.span);
                    }
                    return None;
                };
                if let Some(extra) = t.args.first() {
                    self.err(
                        Diagnostic::error("mailc::arguments", format!("`{name}` takes no arguments"))
                            .at(extra.span())
                            .help("to compare it, write an operator: `:is`, `:contains`, `:matches`, `:regex`, `in`, `==`, `<`, ..."),
                    );
                    return None;
                }
                return Some(Term::Val(val, ty));
            }
        };
        a.finish(self, name)?;
        Some(out)
    }

    /// Counters are kept per fact value by the host, so a rate key must be one of
    /// [`RATE_KEYS`].
    fn check_rate_key(&mut self, key: &Val, span: Span) {
        let ok = matches!(key, Val::Fact(f) if RATE_KEYS.contains(f));
        if !ok {
            let names: Vec<&str> = RATE_KEYS.iter().map(|f| f.info().name).collect();
            self.err(
                Diagnostic::error("mailc::arguments", "counters are kept per client, login, sender or recipient")
                    .at(span)
                    .help(format!("count by one of {}", names.join(", "))),
            );
        }
    }

    fn check_zone(&mut self, zone: &str, span: Span) {
        if zone.is_empty() || zone.contains(char::is_whitespace) || zone.contains('@') || zone.starts_with('.') {
            self.err(
                Diagnostic::error("mailc::arguments", format!("\"{zone}\" is not a DNS zone"))
                    .at(span)
                    .help("write the list's zone, e.g. \"zen.spamhaus.org\""),
            );
        }
    }

    fn test(
        &mut self,
        term: &ast::Term,
        op: Option<(Op, Span)>,
        operand: Option<&Value>,
        span: Span,
        ctx: Ctx,
    ) -> Expr {
        let Some(t) = self.term(term, ctx) else {
            return Expr::Const(false);
        };
        let Some((op, op_span)) = op else {
            return match t {
                Term::Test(e) => e,
                Term::Val(v, Ty::Bool) => Expr::Truth(v),
                Term::Val(_, ty) => {
                    let name = &term.name.name;
                    let example = match ty {
                        Ty::Ip => format!("{name} in trusted_networks"),
                        Ty::Num | Ty::Size | Ty::Duration => format!("{name} > 10"),
                        _ => format!("{name} :is \"...\""),
                    };
                    self.err(
                        Diagnostic::error("mailc::type", format!("`{name}` is {}, not a yes/no test", ty.name()))
                            .at(term.span)
                            .help(format!("compare it, e.g. `{example}`")),
                    );
                    Expr::Const(false)
                }
            };
        };
        let (lhs, ty) = match t {
            Term::Val(v, ty) => (v, ty),
            Term::Test(_) => {
                self.err(
                    Diagnostic::error(
                        "mailc::type",
                        format!("`{}` is a yes/no test and cannot be compared", term.name.name),
                    )
                    .at(op_span)
                    .help("use it alone as a condition, or negate it with `not`"),
                );
                return Expr::Const(false);
            }
        };
        if ty == Ty::Bool {
            self.err(
                Diagnostic::error(
                    "mailc::type",
                    format!("`{}` is a yes/no test and cannot be compared", term.name.name),
                )
                .at(op_span)
                .help(format!("write `{0}` or `not {0}`", term.name.name)),
            );
            return Expr::Const(false);
        }
        match op {
            Op::IsNull => Expr::IsNull(lhs),
            Op::IsNotNull => {
                let e = self.push_expr(Expr::IsNull(lhs));
                Expr::Not(e)
            }
            Op::Is | Op::Contains => {
                let Some(v) = operand else {
                    return Expr::Const(false);
                };
                if matches!(ty, Ty::Num | Ty::Size | Ty::Duration) {
                    self.err(self.num_op_error(&term.name.name, ty, op, op_span));
                    return Expr::Const(false);
                }
                let rhs = self.templates(v, ctx);
                Expr::Match { lhs, op: if op == Op::Is { MatchOp::Is } else { MatchOp::Contains }, rhs }
            }
            Op::Matches | Op::Regex => {
                let Some(v) = operand else {
                    return Expr::Const(false);
                };
                if matches!(ty, Ty::Num | Ty::Size | Ty::Duration) {
                    self.err(self.num_op_error(&term.name.name, ty, op, op_span));
                    return Expr::Const(false);
                }
                let pats = self.patterns(v, op == Op::Matches);
                Expr::Pattern { lhs, pats }
            }
            Op::In | Op::NotIn => {
                let Some(v) = operand else {
                    return Expr::Const(false);
                };
                let set = self.set_ref(v, ty, &term.name.name);
                let e = Expr::In { lhs, set: set.unwrap_or(SetRef::Strings(Vec::new())) };
                if op == Op::NotIn {
                    let id = self.push_expr(e);
                    Expr::Not(id)
                } else {
                    e
                }
            }
            Op::Eq | Op::Ne | Op::Lt | Op::Le | Op::Gt | Op::Ge => {
                let Some(v) = operand else {
                    return Expr::Const(false);
                };
                if !matches!(ty, Ty::Num | Ty::Size | Ty::Duration) {
                    self.err(
                        Diagnostic::error(
                            "mailc::type",
                            format!("`{}` is {}; `{}` compares numbers", term.name.name, ty.name(), op.as_str()),
                        )
                        .at(op_span)
                        .help("compare strings with `:is`, `:contains`, `:matches` or `:regex`"),
                    );
                    return Expr::Const(false);
                }
                let op = match op {
                    Op::Eq => CmpOp::Eq,
                    Op::Ne => CmpOp::Ne,
                    Op::Lt => CmpOp::Lt,
                    Op::Le => CmpOp::Le,
                    Op::Gt => CmpOp::Gt,
                    _ => CmpOp::Ge,
                };
                let _ = span;
                // `> var.limit` / `> client.port`: a limit known at run time, e.g. read from a
                // table with `set limit = "${lookup limits auth.user}";`.
                if let ValueKind::Path(path) = &v.kind {
                    let Some((rhs, rty)) = self.path_val(path, v.span, ctx) else {
                        if !path.starts_with("var.") {
                            self.unknown_term(path, v.span);
                        }
                        return Expr::Const(false);
                    };
                    if !matches!(rty, Ty::Num | Ty::Size | Ty::Duration) && !matches!(rhs, Val::Var(_)) {
                        self.err(
                            Diagnostic::error("mailc::type", format!("`{path}` is {}, not a number", rty.name()))
                                .at(v.span)
                                .help("compare with a number, a number fact or `var.NAME` holding a number"),
                        );
                        return Expr::Const(false);
                    }
                    return Expr::CmpVal { lhs, op, rhs };
                }
                let rhs = self.number_for(ty, v);
                Expr::Cmp { lhs, op, rhs: rhs.unwrap_or(0.0) }
            }
        }
    }

    fn num_op_error(&self, name: &str, ty: Ty, op: Op, span: Span) -> Diagnostic {
        Diagnostic::error("mailc::type", format!("`{name}` is {}; `{}` compares strings", ty.name(), op.as_str()))
            .at(span)
            .help("compare numbers, sizes and durations with ==, !=, <, <=, > or >=")
    }

    fn number_for(&mut self, ty: Ty, v: &Value) -> Option<f64> {
        match (ty, &v.kind) {
            (Ty::Num, ValueKind::Num(n)) => Some(*n),
            (Ty::Size, ValueKind::Size(n)) => Some(*n as f64),
            (Ty::Size, ValueKind::Num(n)) => Some(*n),
            (Ty::Duration, ValueKind::Duration(n)) => Some(*n as f64),
            (Ty::Size, ValueKind::Duration(_)) => {
                self.err(
                    Diagnostic::error("mailc::type", "a size is compared with a duration")
                        .at(v.span)
                        .help("sizes use upper-case K, M and G (`10M`); lower-case `m` means minutes"),
                );
                None
            }
            (Ty::Duration, ValueKind::Num(_)) => {
                self.err(
                    Diagnostic::error("mailc::type", "a duration needs a unit")
                        .at(v.span)
                        .help("write ms, s, m, h, d or w, e.g. `4h`"),
                );
                None
            }
            _ => {
                self.err(
                    Diagnostic::error("mailc::type", format!("expected {} here", ty.name()))
                        .at(v.span)
                        .label(format!("found {}", describe_value(v))),
                );
                None
            }
        }
    }

    fn templates(&mut self, v: &Value, ctx: Ctx) -> Vec<Template> {
        match &v.kind {
            ValueKind::Str(s) => self.template(s, ctx).into_iter().collect(),
            ValueKind::List(items) => items.iter().flat_map(|i| self.templates(i, ctx)).collect(),
            ValueKind::Num(_) => {
                let id = self.intern(self.text(v.span).to_string().as_str());
                vec![Template(vec![Part::Lit(id)])]
            }
            ValueKind::Path(p) => match self.path_val(p, v.span, ctx) {
                Some((val, _)) => vec![Template(vec![Part::Val(val)])],
                None => {
                    if self.syms.contains_key(p) {
                        self.err(
                            Diagnostic::error(
                                "mailc::type",
                                format!("`{p}` is a list or table; `:is` compares with strings"),
                            )
                            .at(v.span)
                            .help(format!("test membership with `in {p}`")),
                        );
                    } else if !p.starts_with("var.") {
                        self.unknown_term(p, v.span);
                    }
                    Vec::new()
                }
            },
            _ => {
                self.err(
                    Diagnostic::error("mailc::type", "expected a string or a list of strings")
                        .at(v.span)
                        .label(format!("found {}", describe_value(v))),
                );
                Vec::new()
            }
        }
    }

    fn patterns(&mut self, v: &Value, glob: bool) -> Vec<PatId> {
        let mut out = Vec::new();
        let items: Vec<&Value> = match &v.kind {
            ValueKind::List(items) => items.iter().collect(),
            _ => vec![v],
        };
        for item in items {
            let ValueKind::Str(s) = &item.kind else {
                self.err(
                    Diagnostic::error("mailc::type", "a pattern must be a string literal")
                        .at(item.span)
                        .label(format!("found {}", describe_value(item))),
                );
                continue;
            };
            let text = match unescape(&s.raw) {
                Ok(t) => t,
                Err((off, msg)) => {
                    self.err(Diagnostic::error("mailc::string", msg).at(Span::new(
                        s.span.file,
                        (s.inner_start() as usize) + off,
                        (s.inner_start() as usize) + off + 2,
                    )));
                    continue;
                }
            };
            let source = if glob { glob_to_regex(&text) } else { text };
            match Pattern::new(&source) {
                Ok(p) => {
                    self.prog.patterns.push(p);
                    out.push(PatId(self.prog.patterns.len() as u32 - 1));
                }
                Err(e) => {
                    let msg = match e {
                        regex::Error::CompiledTooBig(_) => {
                            format!("this regular expression is too large (limit {} bytes compiled)", REGEX_SIZE_LIMIT)
                        }
                        other => format!(
                            "invalid regular expression: {}",
                            other
                                .to_string()
                                .lines()
                                .last()
                                .unwrap_or("syntax error")
                                .trim()
                                .trim_start_matches("error: ")
                        ),
                    };
                    self.err(
                        Diagnostic::error("mailc::regex", msg)
                            .at(s.span)
                            .help("the syntax is that of the Rust regex crate; matching ignores case"),
                    );
                }
            }
        }
        out
    }

    fn set_ref(&mut self, v: &Value, ty: Ty, lhs_name: &str) -> Option<SetRef> {
        match &v.kind {
            ValueKind::Path(p) => {
                let (kind, id, detail) = self.use_sym(p, v.span, &["list", "table"])?;
                match kind {
                    SymKind::List(k) => {
                        match (ty, k) {
                            (Ty::Ip, ListKind::Cidr) | (Ty::Str | Ty::List, ListKind::Strings | ListKind::Domains) => {}
                            (Ty::Ip, _) => self.err(
                                Diagnostic::error(
                                    "mailc::type",
                                    format!("`{lhs_name}` is an IP address but `{p}` is not a cidr list"),
                                )
                                .at(v.span)
                                .help(format!("declare it as `list {p} = cidr [...];`")),
                            ),
                            (_, ListKind::Cidr) => self.err(
                                Diagnostic::error(
                                    "mailc::type",
                                    format!("`{p}` is a cidr list but `{lhs_name}` is {}", ty.name()),
                                )
                                .at(v.span)
                                .help("test IP addresses such as `client.ip` against cidr lists"),
                            ),
                            _ => self.err(
                                Diagnostic::error(
                                    "mailc::type",
                                    format!("`{lhs_name}` is {} and cannot be looked up in a list", ty.name()),
                                )
                                .at(v.span),
                            ),
                        }
                        Some(SetRef::List(ListId(id)))
                    }
                    _ => {
                        if ty == Ty::Ip
                            && !matches!(detail.as_str(), "cidr" | "map" | "list" | "access" | "ldap" | "sql")
                        {
                            self.err(
                                Diagnostic::error(
                                    "mailc::type",
                                    format!("a `{detail}` table cannot be searched by IP address"),
                                )
                                .at(v.span)
                                .help("use a cidr table"),
                            );
                        }
                        Some(SetRef::Table(TableId(id)))
                    }
                }
            }
            ValueKind::List(items) => {
                let mut strs = Vec::new();
                let mut nets = Vec::new();
                for i in items {
                    let s = match &i.kind {
                        ValueKind::Str(s) => unescape_plain(&s.raw),
                        _ => self.text(i.span).to_string(),
                    };
                    if ty == Ty::Ip {
                        match self.cidr(&s, i.span) {
                            Some(c) => nets.push(c),
                            None => self.err(
                                Diagnostic::error("mailc::cidr", format!("\"{s}\" is not a network"))
                                    .at(i.span)
                                    .help("write e.g. \"192.0.2.0/24\""),
                            ),
                        }
                    } else {
                        strs.push(self.intern(&s.to_ascii_lowercase()));
                    }
                }
                Some(if ty == Ty::Ip { SetRef::Nets(nets) } else { SetRef::Strings(strs) })
            }
            ValueKind::Str(s) => {
                let s = unescape_plain(&s.raw);
                if ty == Ty::Ip {
                    match self.cidr(&s, v.span) {
                        Some(c) => Some(SetRef::Nets(vec![c])),
                        None => {
                            self.err(Diagnostic::error("mailc::cidr", format!("\"{s}\" is not a network")).at(v.span));
                            None
                        }
                    }
                } else {
                    Some(SetRef::Strings(vec![self.intern(&s.to_ascii_lowercase())]))
                }
            }
            _ => {
                self.err(
                    Diagnostic::error("mailc::type", "`in` needs a list, a table or `[...]`")
                        .at(v.span)
                        .label(format!("found {}", describe_value(v))),
                );
                None
            }
        }
    }

    /// Parse `${...}` interpolation and escapes; check each interpolated fact's stage.
    fn template(&mut self, s: &ast::StrLit, ctx: Ctx) -> Option<Template> {
        if s.raw.len() > MAX_STRING {
            self.err(Diagnostic::error("mailc::limit", format!("string longer than {MAX_STRING} bytes")).at(s.span));
            return None;
        }
        let base = s.inner_start() as usize;
        let file = s.span.file;
        let raw = s.raw.as_str();
        let mut parts = Vec::new();
        let mut lit = String::new();
        let mut i = 0;
        let bytes = raw.as_bytes();
        let mut ok = true;
        while i < bytes.len() {
            let c = bytes[i];
            if c == b'\\' {
                match bytes.get(i + 1) {
                    Some(b'"') => lit.push('"'),
                    Some(b'\\') => lit.push('\\'),
                    Some(b'$') => lit.push('$'),
                    Some(b't') => lit.push('\t'),
                    _ => {
                        self.err(
                            Diagnostic::error("mailc::string", "unknown escape in a string")
                                .at(Span::new(file, base + i, base + (i + 2).min(bytes.len())))
                                .help("the escapes are \\\" \\\\ \\$ and \\t; a reply cannot span lines"),
                        );
                        ok = false;
                    }
                }
                i += 2;
                continue;
            }
            if c == b'$' && bytes.get(i + 1) == Some(&b'{') {
                let Some(close) = raw[i..].find('}') else {
                    self.err(
                        Diagnostic::error("mailc::interpolation", "`${` is never closed")
                            .at(Span::new(file, base + i, base + i + 2))
                            .help("write `${client.ip}`, or `\\$` for a dollar sign"),
                    );
                    return None;
                };
                let path = raw[i + 2..i + close].trim();
                let pspan = Span::new(file, base + i, base + i + close + 1);
                if !lit.is_empty() {
                    parts.push(Part::Lit(self.intern(&lit)));
                    lit.clear();
                }
                // `${header.NAME}`: the header field's value(s); `${lookup TABLE KEY}`: the value
                // the table gives the key (a fact or `var.NAME`).
                let words: Vec<&str> = path.split_whitespace().collect();
                if let Some(name) = path.strip_prefix("header.") {
                    let name = name.trim();
                    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
                        self.err(
                            Diagnostic::error(
                                "mailc::interpolation",
                                format!("`${{{path}}}`: `{name}` is not a header field name"),
                            )
                            .at(pspan)
                            .help("write the field's name after `header.`, e.g. `${header.subject}`"),
                        );
                        ok = false;
                    } else {
                        self.stage_check("header", Stages::from(Stage::Data), pspan, ctx);
                        parts.push(Part::Val(Val::Header(self.intern(&name.to_ascii_lowercase()))));
                    }
                    i += close + 1;
                    continue;
                }
                if words.first() == Some(&"lookup") {
                    let (Some(table), Some(key), None) = (words.get(1), words.get(2), words.get(3)) else {
                        self.err(
                            Diagnostic::error(
                                "mailc::interpolation",
                                format!("`${{{path}}}`: expected `${{lookup TABLE KEY}}`"),
                            )
                            .at(pspan)
                            .help("e.g. `${lookup relocated recipient}`: the key is a fact or `var.NAME`"),
                        );
                        ok = false;
                        i += close + 1;
                        continue;
                    };
                    match (self.use_sym(table, pspan, &["table"]), self.path_val(key, pspan, ctx)) {
                        (Some((_, id, _)), Some((k, _))) => {
                            parts.push(Part::Val(Val::Lookup { table: TableId(id), key: Box::new(k) }))
                        }
                        (_, key_val) => {
                            if key_val.is_none() && !key.starts_with("var.") {
                                self.unknown_term(key, pspan);
                            }
                            ok = false;
                        }
                    }
                    i += close + 1;
                    continue;
                }
                match self.path_val(path, pspan, ctx) {
                    Some((v, _)) => parts.push(Part::Val(v)),
                    None => {
                        ok = false;
                        if !path.starts_with("var.") {
                            let mut d =
                                Diagnostic::error("mailc::interpolation", format!("`${{{path}}}` names no fact"))
                                    .at(pspan);
                            let cands: Vec<&str> = Fact::ALL.iter().map(|f| f.info().name).collect();
                            d = match did_you_mean(path, cands) {
                                Some(s) => d.help(format!("did you mean `${{{s}}}`?")),
                                None => d.help("interpolate a fact (`${client.ip}`) or a variable (`${var.NAME}`)"),
                            };
                            self.err(d);
                        }
                    }
                }
                i += close + 1;
                continue;
            }
            // push the whole UTF-8 character
            let ch_len = utf8_len(c);
            lit.push_str(raw.get(i..i + ch_len).unwrap_or(""));
            i += ch_len;
        }
        if !lit.is_empty() {
            parts.push(Part::Lit(self.intern(&lit)));
        }
        ok.then_some(Template(parts))
    }

    fn string_arg(&mut self, v: &Value, ctx: Ctx, what: &str) -> Option<Template> {
        match &v.kind {
            ValueKind::Str(s) => self.template(s, ctx),
            ValueKind::Path(p) => {
                let (val, _) = self.path_val(p, v.span, ctx)?;
                Some(Template(vec![Part::Val(val)]))
            }
            _ => {
                self.err(
                    Diagnostic::error("mailc::type", format!("expected {what}"))
                        .at(v.span)
                        .label(format!("found {}", describe_value(v))),
                );
                None
            }
        }
    }

    // ---- actions ----------------------------------------------------------------------

    fn action(&mut self, name: &ast::Ident, args: &[Arg], span: Span, ctx: Ctx) -> Option<Action> {
        let Some(spec) = ACTIONS.iter().find(|a| a.0 == name.name) else {
            let mut d = Diagnostic::error("mailc::undefined", format!("unknown action `{}`", name.name))
                .at(name.span)
                .label("not an action");
            d = match did_you_mean(&name.name, ACTIONS.iter().map(|a| a.0).chain(["use"])) {
                Some(s) => d.help(format!("did you mean `{s}`?")),
                None => {
                    d.help(format!("the actions are {}", ACTIONS.iter().map(|a| a.0).collect::<Vec<_>>().join(", ")))
                }
            };
            self.err(d);
            return None;
        };
        if let Some(cap) = spec.2 {
            self.need_cap(cap, name.span, spec.0);
        }
        if !spec.1.contains(ctx.stage) {
            let d = Diagnostic::error("mailc::stage", format!("`{}` cannot be used in `{}`", spec.0, ctx.stage.name()))
                .at(name.span)
                .label(format!("used in `{}`", ctx.stage.name()))
                .help(format!("`{}` works in {}", spec.0, spec.1.describe()));
            let d = self.via(d, ctx);
            self.err(d);
        }
        let mut a = ArgCursor::new(args, span);
        let action = match spec.0 {
            "accept" => Action::Accept,
            "discard" => Action::Discard,
            "stop" => Action::Stop,
            "reject" | "tempfail" => {
                if spec.0 == "reject" && a.peek_word() == Some("callahead") {
                    a.next();
                    self.need_cap("callahead", name.span, "reject callahead");
                    if ctx.stage != Stage::Rcpt {
                        self.err(Diagnostic::error("mailc::stage", "`reject callahead` works only in `rcpt`").at(span));
                    }
                    a.finish(self, "reject callahead")?;
                    return Some(Action::RejectCallahead);
                }
                let reply = self.reply(&mut a, spec.0 == "reject", ctx, span)?;
                if spec.0 == "reject" {
                    Action::Reject(reply)
                } else {
                    Action::Tempfail(reply)
                }
            }
            "set" => {
                let (v, vspan) = a.word(self, "a name, e.g. `set internal;` or `set tier = \"gold\";`")?;
                check_var_name(self, &v, vspan);
                let id = self.vars.get(&v).map(|i| i.id)?;
                let value = if a.take_eq() {
                    let val = a.value(self, "a value after `=`")?;
                    Some(self.string_arg(val, ctx, "a string or a fact")?)
                } else {
                    None
                };
                Action::Set { var: id, value }
            }
            "unset" => {
                let (v, vspan) = a.word(self, "a name")?;
                let id = self.read_var(&v, vspan, ctx)?;
                Action::Unset(id)
            }
            "log" => {
                let v = a.value(self, "a message, e.g. `log \"would reject ${client.ip}\"`")?;
                Action::Log(self.string_arg(v, ctx, "a message string")?)
            }
            "greet" => {
                a.keyword(self, "pause", "greet pause 5s")?;
                let (d, dspan) = a.duration(self, "how long to hold the banner, e.g. 5s")?;
                if d > 300_000 {
                    self.err(
                        Diagnostic::error("mailc::limit", "a greet pause longer than 5 minutes")
                            .at(dspan)
                            .help("clients give up after 5 minutes (RFC 5321 4.5.3.2.1); 3s to 10s is usual"),
                    );
                }
                Action::GreetPause(d)
            }
            "tarpit" => {
                let (d, dspan) = a.duration(self, "how long to delay the reply, e.g. 1s")?;
                if d > 300_000 {
                    self.err(
                        Diagnostic::error("mailc::limit", "a tarpit longer than 5 minutes")
                            .at(dspan)
                            .help("clients time out after 5 minutes; a second or a few is usual"),
                    );
                }
                Action::Tarpit(d)
            }
            "dsn" => {
                let (w, wspan) = a.word(self, "`notify never`, `deny success` or `ret headers`")?;
                let (w2, _) = a.word(self, "`notify never`, `deny success` or `ret headers`")?;
                let (act, stages) = match (w.as_str(), w2.as_str()) {
                    ("notify", "never") => (DsnAction::NotifyNever, Stages::one(Stage::Rcpt)),
                    ("deny", "success") => (DsnAction::DenySuccess, Stages::one(Stage::Rcpt)),
                    ("ret", "headers") => (DsnAction::RetHeaders, Stages::one(Stage::Mail)),
                    _ => {
                        self.err(
                            Diagnostic::error("mailc::arguments", format!("`dsn {w} {w2}` is not a DSN action"))
                                .at(wspan)
                                .help(
                                    "write `dsn notify never;` (R3b), `dsn deny success;` (R4) or `dsn ret headers;`",
                                ),
                        );
                        return None;
                    }
                };
                if !stages.contains(ctx.stage) {
                    self.err(
                        Diagnostic::error(
                            "mailc::stage",
                            format!("`dsn {w} {w2}` works only in `{}`", stages.describe()),
                        )
                        .at(span),
                    );
                }
                Action::Dsn(act)
            }
            "header" => {
                let (w, wspan) = a.word(self, "`add`, `remove` or `replace`")?;
                let (h, hspan) = a.plain_string(self, "a header name")?;
                if h.is_empty() || h.contains(':') || !h.bytes().all(|b| b.is_ascii_graphic()) {
                    self.err(
                        Diagnostic::error("mailc::arguments", format!("\"{h}\" is not a header name"))
                            .at(hspan)
                            .help("field names are printable ASCII without `:` or spaces"),
                    );
                }
                let hid = self.intern(&h);
                match w.as_str() {
                    "add" | "replace" => {
                        let v = a.value(self, "the header's value")?;
                        let value = self.string_arg(v, ctx, "the header's value")?;
                        if w == "add" {
                            Action::HeaderAdd { name: hid, value }
                        } else {
                            Action::HeaderReplace { name: hid, value }
                        }
                    }
                    "remove" => Action::HeaderRemove(hid),
                    _ => {
                        self.err(
                            Diagnostic::error(
                                "mailc::arguments",
                                format!("`header {w}`: expected add, remove or replace"),
                            )
                            .at(wspan),
                        );
                        return None;
                    }
                }
            }
            "hold" => {
                let reason = match a.peek_value() {
                    Some(_) => {
                        let v = a.value(self, "a reason")?;
                        Some(self.string_arg(v, ctx, "a reason string")?)
                    }
                    None => None,
                };
                Action::Hold(reason)
            }
            "redirect" | "bcc" | "archive" => {
                let what = if spec.0 == "archive" { "a folder name" } else { "an address" };
                let v = a.value(self, what)?;
                let t = self.string_arg(v, ctx, what)?;
                if spec.0 != "archive" {
                    self.check_address_literal(v);
                }
                match spec.0 {
                    "redirect" => Action::Redirect(t),
                    "bcc" => Action::Bcc(t),
                    _ => Action::Archive(t),
                }
            }
            "deliver" | "filter" => {
                let t = self.transport(&mut a, ctx, spec.0 == "filter")?;
                if spec.0 == "deliver" {
                    Action::Deliver(t)
                } else {
                    Action::Filter(t)
                }
            }
            "rewrite" => {
                let (w, wspan) = a.word(self, "`sender` or `recipient`")?;
                let v = a.value(self, "the new address, or a table to map it with")?;
                let rw = match &v.kind {
                    ValueKind::Path(p) if self.syms.contains_key(p.as_str()) => {
                        let (_, id, _) = self.use_sym(p, v.span, &["table"])?;
                        Rewrite::Map(TableId(id))
                    }
                    _ => Rewrite::To(self.string_arg(v, ctx, "an address")?),
                };
                match w.as_str() {
                    "sender" => {
                        if !Stages::range(Stage::Mail, Stage::Data).with(Stage::Route).contains(ctx.stage) {
                            self.err(
                                Diagnostic::error(
                                    "mailc::stage",
                                    format!("`rewrite sender` cannot be used in `{}`", ctx.stage.name()),
                                )
                                .at(span)
                                .help("it works in mail, rcpt, data and route"),
                            );
                        }
                        Action::RewriteSender(rw)
                    }
                    "recipient" => {
                        if !Stages::one(Stage::Rcpt).with(Stage::Route).contains(ctx.stage) {
                            self.err(
                                Diagnostic::error(
                                    "mailc::stage",
                                    format!("`rewrite recipient` cannot be used in `{}`", ctx.stage.name()),
                                )
                                .at(span)
                                .help("it works in rcpt and route"),
                            );
                        }
                        Action::RewriteRecipient(rw)
                    }
                    _ => {
                        self.err(
                            Diagnostic::error("mailc::arguments", format!("cannot rewrite `{w}`"))
                                .at(wspan)
                                .help("write `rewrite sender ...` or `rewrite recipient ...`"),
                        );
                        return None;
                    }
                }
            }
            "masquerade" => {
                let v = a.value(self, "the domains to masquerade as, e.g. `masquerade [\"example.com\"]`")?;
                let domains = match &v.kind {
                    ValueKind::Path(p) => {
                        let (kind, id, _) = self.use_sym(p, v.span, &["list"])?;
                        if kind == SymKind::List(ListKind::Cidr) {
                            self.err(
                                Diagnostic::error(
                                    "mailc::type",
                                    format!("`{p}` is a cidr list; masquerade needs domains"),
                                )
                                .at(v.span),
                            );
                        }
                        let items = self.prog.lists.get(id as usize).map(|l| l.items.clone()).unwrap_or_default();
                        items.iter().map(|s| self.intern(s)).collect()
                    }
                    ValueKind::List(items) => items
                        .iter()
                        .filter_map(|i| {
                            if let ValueKind::Str(s) = &i.kind {
                                Some(unescape_plain(&s.raw).to_ascii_lowercase())
                            } else {
                                None
                            }
                        })
                        .collect::<Vec<_>>()
                        .iter()
                        .map(|s| self.intern(s))
                        .collect(),
                    ValueKind::Str(s) => {
                        vec![self.intern(&unescape_plain(&s.raw).to_ascii_lowercase())]
                    }
                    _ => {
                        self.err(
                            Diagnostic::error(
                                "mailc::type",
                                "masquerade needs a domain, a list of domains or a list name",
                            )
                            .at(v.span),
                        );
                        return None;
                    }
                };
                Action::Masquerade(domains)
            }
            "expand" => {
                let (t, tspan) = a.word(self, "an alias table or a mailing list, e.g. `expand aliases`")?;
                match self.use_sym(&t, tspan, &["table", "mailing list"])? {
                    (SymKind::MailingList, id, _) => Action::ExpandList(id),
                    (_, id, _) => Action::Expand(TableId(id)),
                }
            }
            "alert" => {
                let to = a.value(self, "the address to alert")?;
                let to_t = self.string_arg(to, ctx, "an address")?;
                self.check_address_literal(to);
                let text = a.value(self, "the alert text")?;
                let text_t = self.string_arg(text, ctx, "the alert text")?;
                let every = a.tag_duration(self, "every")?.unwrap_or(3_600_000);
                Action::Alert { to: to_t, text: text_t, every_ms: every }
            }
            "batv" => {
                a.keyword(self, "sign", "batv sign")?;
                Action::BatvSign
            }
            "access" => {
                let (t, tspan) = a.word(self, "an access table, e.g. `access access_map`")?;
                let (_, id, detail) = self.use_sym(&t, tspan, &["table"])?;
                if !matches!(detail.as_str(), "access" | "map" | "cidr" | "regexp" | "pcre" | "ldap" | "sql") {
                    self.err(
                        Diagnostic::error(
                            "mailc::type",
                            format!("`{t}` is a `{detail}` table; `access` needs values such as OK or REJECT"),
                        )
                        .at(tspan)
                        .help("declare it as `table NAME = access \"FILE\";`"),
                    );
                }
                // sendmail's delay_checks: `:delay`, `:delay friend` or `:delay hater`.
                let mut delay = AccessDelay::Now;
                if a.peek_tag().is_some_and(|t| t.name == "delay") {
                    let tag_span = a.peek().map(|x| x.span()).unwrap_or(span);
                    a.next();
                    delay = match a.peek_word() {
                        Some("hater") => {
                            a.next();
                            AccessDelay::Hater
                        }
                        Some("friend") => {
                            a.next();
                            AccessDelay::Friend
                        }
                        _ => AccessDelay::Friend,
                    };
                    if matches!(ctx.stage, Stage::Rcpt) {
                        self.err(
                            Diagnostic::error("mailc::arguments", "`:delay` holds a refusal for the recipients; at rcpt there is nothing to hold it for")
                                .at(tag_span)
                                .help("use `access TABLE :delay;` in connect, helo or mail, and `access TABLE;` in rcpt for the FRIEND and HATER entries"),
                        );
                    }
                }
                Action::Access(TableId(id), delay)
            }
            other => unreachable!("action table lists `{other}` without lowering"),
        };
        a.finish(self, spec.0)?;
        Some(action)
    }

    fn check_address_literal(&mut self, v: &Value) {
        if let ValueKind::Str(s) = &v.kind {
            if !s.raw.contains("${") && !s.raw.contains('@') {
                self.err(
                    Diagnostic::error("mailc::arguments", format!("\"{}\" is not an email address", s.raw))
                        .at(v.span)
                        .help("write a full address such as \"archive@example.com\""),
                );
            }
        }
    }

    fn reply(&mut self, a: &mut ArgCursor, reject: bool, ctx: Ctx, span: Span) -> Option<Reply> {
        let class: u16 = if reject { 5 } else { 4 };
        let (def_code, def_enh, def_text) = default_reply(reject, ctx.stage);
        let mut code = def_code;
        let mut code_span = span;
        let mut enh = None;
        let mut text = None;
        if let Some(v) = a.peek_value() {
            if let ValueKind::Num(n) = v.kind {
                code_span = v.span;
                a.next();
                if n.fract() != 0.0 || !(100.0..=599.0).contains(&n) {
                    self.err(
                        Diagnostic::error("mailc::reply", format!("`{}` is not a reply code", self.text(v.span)))
                            .at(v.span)
                            .help("reply codes have three digits, e.g. 550"),
                    );
                    return None;
                }
                code = n as u16;
            }
        }
        if let Some(v) = a.peek_value() {
            if let ValueKind::Enh(c, s, d) = v.kind {
                a.next();
                enh = Some(((c, s, d), v.span));
            }
        }
        if let Some(v) = a.peek_value() {
            if matches!(v.kind, ValueKind::Str(_) | ValueKind::Path(_)) {
                a.next();
                if let ValueKind::Str(s) = &v.kind {
                    let plain = unescape_plain(&s.raw);
                    if plain.trim().is_empty() {
                        self.err(
                            Diagnostic::error("mailc::reply", "the reply text is empty")
                                .at(v.span)
                                .help("say why, e.g. \"Relay access denied\""),
                        );
                    }
                    if !plain.chars().all(|c| c == '\t' || (' '..='~').contains(&c)) {
                        self.err(
                            Diagnostic::error("mailc::reply", "reply text must be printable ASCII")
                                .at(v.span)
                                .help("SMTP replies are ASCII (RFC 5321 4.2)"),
                        );
                    }
                }
                text = Some(self.string_arg(v, ctx, "the reply text")?);
            }
        }
        let verb = if reject { "reject" } else { "tempfail" };
        if code / 100 != class {
            let want = if reject { "5xx, e.g. 550 or 554" } else { "4xx, e.g. 450 or 451" };
            let other = if reject { "tempfail" } else { "reject" };
            self.err(
                Diagnostic::error("mailc::reply", format!("`{verb}` needs a {class}xx code, not {code}"))
                    .at(code_span)
                    .help(format!("use {want}; for a {}xx reply write `{other}`", code / 100)),
            );
        }
        if (code == 421 || code == 521) && !ctx.stage.is_session() {
            self.err(
                Diagnostic::error(
                    "mailc::reply",
                    format!("{code} closes an SMTP session; there is none in `{}`", ctx.stage.name()),
                )
                .at(code_span),
            );
        }
        let enhanced = match enh {
            Some(((c, s, d), espan)) => {
                if c != code / 100 {
                    self.err(
                        Diagnostic::error(
                            "mailc::reply",
                            format!("enhanced status {c}.{s}.{d} does not match reply code {code}"),
                        )
                        .at(espan)
                        .help(format!("the first digit must be the same: {}.{s}.{d} (RFC 3463)", code / 100)),
                    );
                }
                if !(2..=5).contains(&c) || s > 7 || d > 999 {
                    self.err(
                        Diagnostic::error("mailc::reply", format!("{c}.{s}.{d} is not an enhanced status code"))
                            .at(espan)
                            .help("class 2, 4 or 5, subject 0 to 7, detail 0 to 999 (RFC 3463)"),
                    );
                }
                (c, s, d)
            }
            None => (code / 100, def_enh.1, def_enh.2),
        };
        let text = match text {
            Some(t) => t,
            None => Template(vec![Part::Lit(self.intern(def_text))]),
        };
        Some(Reply { code, enhanced, text })
    }

    fn transport(&mut self, a: &mut ArgCursor, ctx: Ctx, filter: bool) -> Option<Transport> {
        let usage = "mx, smtp \"host\", lmtp \"host:port\", maildir \"folder\" or mbox \"file\"";
        let (k, kspan) = a.word(self, usage)?;
        let kind = match k.as_str() {
            "mx" => TransportKind::Mx,
            "smtp" => TransportKind::Smtp,
            "lmtp" => TransportKind::Lmtp,
            "maildir" => TransportKind::Maildir,
            "mbox" => TransportKind::Mbox,
            _ => {
                let mut d = Diagnostic::error("mailc::arguments", format!("there is no transport `{k}`")).at(kspan);
                d = match did_you_mean(&k, ["mx", "smtp", "lmtp", "maildir", "mbox"]) {
                    Some(s) => d.help(format!("did you mean `{s}`?")),
                    None => d.help(format!("transports: {usage}")),
                };
                self.err(d);
                return None;
            }
        };
        if filter && !matches!(kind, TransportKind::Smtp | TransportKind::Lmtp) {
            self.err(
                Diagnostic::error("mailc::arguments", "a content filter is reached over smtp or lmtp")
                    .at(kspan)
                    .help("filter smtp \"[127.0.0.1]:10025\";"),
            );
        }
        let dest = match (kind, a.peek_value().map(|v| matches!(v.kind, ValueKind::Str(_)))) {
            (TransportKind::Mx, Some(true)) => {
                self.err(
                    Diagnostic::error("mailc::arguments", "`deliver mx` takes no destination")
                        .at(kspan)
                        .help("to send to a fixed host write `deliver smtp \"[host]:25\"`"),
                );
                None
            }
            (TransportKind::Mx, _) => None,
            (TransportKind::Maildir, Some(true))
            | (TransportKind::Smtp | TransportKind::Lmtp | TransportKind::Mbox, _) => {
                let v = a.value(self, "a destination string")?;
                if let ValueKind::Str(s) = &v.kind {
                    if matches!(kind, TransportKind::Smtp | TransportKind::Lmtp) && !s.raw.contains("${") {
                        check_host(self, &unescape_plain(&s.raw), v.span, kind);
                    }
                }
                Some(self.string_arg(v, ctx, "a destination string")?)
            }
            (TransportKind::Maildir, _) => None,
        };
        let mut tls = TlsMode::May;
        let mut auth = None;
        let mut ca = None;
        while let Some(tag) = a.peek_tag() {
            let tspan = tag.span;
            match tag.name.as_str() {
                "tls" => {
                    a.next();
                    let (m, mspan) = a.word(self, "required, may or none")?;
                    tls = match m.as_str() {
                        "required" => TlsMode::Required,
                        "may" => TlsMode::May,
                        "none" => TlsMode::None,
                        _ => {
                            self.err(
                                Diagnostic::error(
                                    "mailc::arguments",
                                    format!("`:tls {m}`: expected required, may or none"),
                                )
                                .at(mspan),
                            );
                            TlsMode::May
                        }
                    };
                }
                "auth" => {
                    a.next();
                    let (s, sspan) = a.word(self, "the name of a secret holding \"user:password\"")?;
                    if let Some((_, id, _)) = self.use_sym(&s, sspan, &["secret"]) {
                        auth = Some(SecretId(id));
                    }
                    if !matches!(kind, TransportKind::Smtp | TransportKind::Mx) {
                        self.err(
                            Diagnostic::error("mailc::arguments", "`:auth` is for smtp delivery to a smarthost")
                                .at(tspan),
                        );
                    }
                }
                "ca" => {
                    a.next();
                    let (file, fspan) = a.plain_string(self, "the PEM file of the CA certificates to trust")?;
                    if !matches!(kind, TransportKind::Smtp | TransportKind::Mx | TransportKind::Lmtp) {
                        self.err(
                            Diagnostic::error(
                                "mailc::arguments",
                                "`:ca` is for TLS to another server (smtp, mx, lmtp)",
                            )
                            .at(tspan),
                        );
                    }
                    if file.trim().is_empty() {
                        self.err(Diagnostic::error("mailc::arguments", "`:ca` needs a file name").at(fspan));
                    }
                    ca = Some(self.intern(&file));
                }
                other => {
                    self.err(
                        Diagnostic::error("mailc::arguments", format!("`{k}` has no option `:{other}`"))
                            .at(tspan)
                            .help("options: :tls required|may|none, :auth SECRET, :ca \"FILE\""),
                    );
                    a.next();
                }
            }
        }
        Some(Transport { kind, dest, tls, auth, ca })
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

fn check_host(c: &mut Checker, s: &str, span: Span, kind: TransportKind) {
    if let Some(path) = s.strip_prefix("unix:") {
        if kind == TransportKind::Lmtp && path.starts_with('/') {
            return;
        }
    }
    let host = if let Some(rest) = s.strip_prefix('[') {
        match rest.split_once(']') {
            Some((h, port)) => {
                if !port.is_empty() && !(port.starts_with(':') && port[1..].parse::<u16>().is_ok()) {
                    c.err(
                        Diagnostic::error("mailc::arguments", format!("bad port in \"{s}\""))
                            .at(span)
                            .help("write \"[host]:25\""),
                    );
                }
                h.to_string()
            }
            None => {
                c.err(Diagnostic::error("mailc::arguments", format!("unclosed `[` in \"{s}\"")).at(span));
                return;
            }
        }
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) if p.parse::<u16>().is_ok() => h.to_string(),
            Some(_) if s.parse::<std::net::Ipv6Addr>().is_err() => {
                c.err(
                    Diagnostic::error("mailc::arguments", format!("bad port in \"{s}\""))
                        .at(span)
                        .help("write \"host:25\""),
                );
                return;
            }
            _ => s.to_string(),
        }
    };
    if host.is_empty() || host.contains(char::is_whitespace) || host.contains('@') {
        c.err(
            Diagnostic::error("mailc::arguments", format!("\"{s}\" is not a host"))
                .at(span)
                .help("write a host name or address, e.g. \"[10.0.0.5]:25\" (brackets skip the MX lookup)"),
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

/// Default reply of `reject` / `tempfail` without a code, by stage.
/// The reply of `reject` / `tempfail` without a code, by stage (spec/language.md section 10).
pub fn default_reply(reject: bool, stage: Stage) -> (u16, (u16, u16, u16), &'static str) {
    match (reject, stage) {
        (true, Stage::Connect) => (554, (5, 7, 1), "Access denied"),
        (true, Stage::Rcpt) => (550, (5, 7, 1), "Recipient rejected by policy"),
        (true, Stage::Mail) => (550, (5, 7, 1), "Sender rejected by policy"),
        (true, Stage::Data) => (550, (5, 7, 1), "Message rejected by policy"),
        (true, _) => (550, (5, 7, 1), "Rejected by policy"),
        (false, Stage::Connect) => (421, (4, 3, 2), "Service not available, try again later"),
        (false, _) => (451, (4, 7, 1), "Try again later"),
    }
}

/// Facts a `rate` or `concurrent` value may count by.
pub const RATE_KEYS: &[Fact] = &[
    Fact::ClientIp,
    Fact::ClientNetwork,
    Fact::ClientName,
    Fact::HeloName,
    Fact::AuthUser,
    Fact::Sender,
    Fact::SenderDomain,
    Fact::Recipient,
    Fact::RecipientDomain,
];

/// Built-in test names (for "did you mean").
pub const TESTS: &[(&str, &str)] = &[
    ("flag", "flag NAME"),
    ("header", "header \"NAME\""),
    ("lookup", "lookup TABLE KEY"),
    ("rate", "rate COUNTER by KEY per WINDOW"),
    ("concurrent", "concurrent by KEY"),
    ("score", "score SCANNER"),
    ("dnsbl", "dnsbl \"ZONE\" [:returns [...]]"),
    ("rhsbl", "rhsbl \"ZONE\" [DOMAIN] [:returns [...]]"),
    ("resolvable", "resolvable DOMAIN"),
    ("fqdn", "fqdn NAME"),
    ("batv", "batv valid"),
    ("callahead", "callahead"),
    ("greylist", "greylist [:delay D] [:expire D]"),
    ("login_mismatch", "login_mismatch TABLE"),
];

const SESS: Stages = Stages::SESSION;

/// Actions: name, stages where allowed, capability.
pub const ACTIONS: &[(&str, Stages, Option<&str>)] = &[
    ("accept", SESS, None),
    ("reject", SESS.with(Stage::Route).with(Stage::Deliver), None),
    ("tempfail", SESS.with(Stage::Route).with(Stage::Deliver), None),
    ("discard", SESS.with(Stage::Bounce).with(Stage::Delay), None),
    ("stop", Stages::ALL, None),
    ("set", Stages::ALL, None),
    ("unset", Stages::ALL, None),
    ("log", Stages::ALL, None),
    ("greet", Stages::one(Stage::Connect), None),
    ("tarpit", SESS, None),
    ("dsn", Stages::range(Stage::Mail, Stage::Rcpt), None),
    ("header", Stages::one(Stage::Data).with(Stage::Route).with(Stage::Bounce), None),
    ("hold", SESS.with(Stage::Route), None),
    ("redirect", Stages::range(Stage::Rcpt, Stage::Data).with(Stage::Route), None),
    ("bcc", Stages::range(Stage::Mail, Stage::Data).with(Stage::Route), None),
    ("archive", Stages::one(Stage::Data).with(Stage::Route), None),
    ("filter", Stages::range(Stage::Connect, Stage::Data), None),
    ("deliver", Stages::one(Stage::Route), None),
    ("rewrite", Stages::range(Stage::Mail, Stage::Data).with(Stage::Route), None),
    ("masquerade", Stages::one(Stage::Route), None),
    ("expand", Stages::one(Stage::Route), None),
    ("alert", Stages::ALL, None),
    ("batv", Stages::range(Stage::Mail, Stage::Data), Some("batv")),
    ("access", Stages::range(Stage::Connect, Stage::Rcpt), None),
];

/// Walks an action's or a test's arguments.
struct ArgCursor<'a> {
    args: &'a [Arg],
    pos: usize,
    span: Span,
}

impl<'a> ArgCursor<'a> {
    fn new(args: &'a [Arg], span: Span) -> ArgCursor<'a> {
        ArgCursor { args, pos: 0, span }
    }
    fn next(&mut self) {
        self.pos += 1;
    }
    fn peek(&self) -> Option<&'a Arg> {
        self.args.get(self.pos)
    }
    fn peek_value(&self) -> Option<&'a Value> {
        match self.peek() {
            Some(Arg::Value(v)) => Some(v),
            _ => None,
        }
    }
    fn peek_word(&self) -> Option<&'a str> {
        match self.peek_value().map(|v| &v.kind) {
            Some(ValueKind::Path(p)) => Some(p.as_str()),
            _ => None,
        }
    }
    fn peek_tag(&self) -> Option<&'a ast::Ident> {
        match self.peek() {
            Some(Arg::Tag(t)) => Some(t),
            _ => None,
        }
    }
    fn missing(&self, c: &mut Checker, what: &str) {
        let at = match self.peek() {
            Some(a) => a.span(),
            None => Span { file: self.span.file, start: self.span.end, end: self.span.end },
        };
        let found = match self.peek() {
            Some(Arg::Tag(t)) => format!("found `:{}`", t.name),
            Some(Arg::Eq(_)) => "found `=`".into(),
            Some(Arg::Value(v)) => format!("found {}", describe_value(v)),
            None => "found nothing".into(),
        };
        c.err(Diagnostic::error("mailc::arguments", format!("expected {what}")).at(at).label(found));
    }
    fn value(&mut self, c: &mut Checker, what: &str) -> Option<&'a Value> {
        match self.peek_value() {
            Some(v) => {
                self.pos += 1;
                Some(v)
            }
            None => {
                self.missing(c, what);
                None
            }
        }
    }
    fn word(&mut self, c: &mut Checker, what: &str) -> Option<(String, Span)> {
        match self.peek_value() {
            Some(Value { kind: ValueKind::Path(p), span }) => {
                self.pos += 1;
                Some((p.clone(), *span))
            }
            _ => {
                self.missing(c, what);
                None
            }
        }
    }
    fn keyword(&mut self, c: &mut Checker, kw: &str, example: &str) -> Option<()> {
        if self.peek_word() == Some(kw) {
            self.pos += 1;
            return Some(());
        }
        self.missing(c, &format!("`{kw}`, as in `{example}`"));
        None
    }
    fn take_eq(&mut self) -> bool {
        if matches!(self.peek(), Some(Arg::Eq(_))) {
            self.pos += 1;
            true
        } else {
            false
        }
    }
    fn plain_string(&mut self, c: &mut Checker, what: &str) -> Option<(String, Span)> {
        match self.peek_value() {
            Some(Value { kind: ValueKind::Str(s), span }) => {
                self.pos += 1;
                if s.raw.contains("${") {
                    c.err(
                        Diagnostic::error(
                            "mailc::interpolation",
                            "no `${...}` here: this string is fixed when the policy loads",
                        )
                        .at(*span),
                    );
                }
                Some((unescape_plain(&s.raw), *span))
            }
            _ => {
                self.missing(c, what);
                None
            }
        }
    }
    fn duration(&mut self, c: &mut Checker, what: &str) -> Option<(u64, Span)> {
        match self.peek_value() {
            Some(Value { kind: ValueKind::Duration(d), span }) => {
                self.pos += 1;
                Some((*d, *span))
            }
            Some(v @ Value { kind: ValueKind::Size(_), .. }) => {
                c.err(
                    Diagnostic::error("mailc::type", format!("expected {what}, found a size"))
                        .at(v.span)
                        .help("durations use lower-case units: ms, s, m, h, d, w (`1m` is a minute, `1M` a megabyte)"),
                );
                None
            }
            _ => {
                self.missing(c, what);
                None
            }
        }
    }
    fn val(&mut self, c: &mut Checker, ctx: Ctx, what: &str) -> Option<(Val, Ty)> {
        match self.peek_value() {
            Some(Value { kind: ValueKind::Path(p), span }) => {
                self.pos += 1;
                match c.path_val(p, *span, ctx) {
                    Some(v) => Some(v),
                    None => {
                        if !p.starts_with("var.") {
                            c.unknown_term(p, *span);
                        }
                        None
                    }
                }
            }
            Some(Value { kind: ValueKind::Str(s), span }) => {
                self.pos += 1;
                if s.raw.contains("${") {
                    c.err(
                        Diagnostic::error("mailc::interpolation", "write the fact itself here, not a `${...}` string")
                            .at(*span)
                            .help("e.g. `lookup access sender.domain`"),
                    );
                    return None;
                }
                Some((Val::Lit(c.intern(&unescape_plain(&s.raw))), Ty::Str))
            }
            _ => {
                self.missing(c, what);
                None
            }
        }
    }
    fn tag_value(&mut self, c: &mut Checker, tag: &str) -> Option<Option<&'a Value>> {
        match self.peek_tag() {
            Some(t) if t.name == tag => {
                self.pos += 1;
                match self.peek_value() {
                    Some(v) => {
                        self.pos += 1;
                        Some(Some(v))
                    }
                    None => {
                        self.missing(c, &format!("a value after `:{tag}`"));
                        None
                    }
                }
            }
            _ => Some(None),
        }
    }
    fn tag_strings(&mut self, c: &mut Checker, tag: &str) -> Option<Vec<StrId>> {
        let Some(v) = self.tag_value(c, tag)? else {
            return Some(Vec::new());
        };
        let items: Vec<&Value> = match &v.kind {
            ValueKind::List(items) => items.iter().collect(),
            _ => vec![v],
        };
        let mut out = Vec::new();
        for i in items {
            match &i.kind {
                ValueKind::Str(s) => {
                    let s = unescape_plain(&s.raw);
                    if s.parse::<std::net::Ipv4Addr>().is_err() {
                        c.err(
                            Diagnostic::error("mailc::arguments", format!("\"{s}\" is not an IPv4 address"))
                                .at(i.span)
                                .help("list the answers to match, e.g. :returns [\"127.0.0.2\", \"127.0.0.4\"]"),
                        );
                    }
                    out.push(c.intern(&s));
                }
                _ => c.err(Diagnostic::error("mailc::type", "expected a string").at(i.span)),
            }
        }
        Some(out)
    }
    fn tag_duration(&mut self, c: &mut Checker, tag: &str) -> Option<Option<u64>> {
        let Some(v) = self.tag_value(c, tag)? else {
            return Some(None);
        };
        match v.kind {
            ValueKind::Duration(d) => Some(Some(d)),
            _ => {
                c.err(
                    Diagnostic::error("mailc::type", format!("`:{tag}` takes a duration"))
                        .at(v.span)
                        .label(format!("found {}", describe_value(v))),
                );
                None
            }
        }
    }
    fn finish(&self, c: &mut Checker, name: &str) -> Option<()> {
        if let Some(extra) = self.peek() {
            let what = match extra {
                Arg::Tag(t) => format!("`{name}` has no option `:{}`", t.name),
                Arg::Eq(_) => format!("unexpected `=` after `{name}`"),
                Arg::Value(v) => format!("`{name}` does not take {} here", describe_value(v)),
            };
            c.err(Diagnostic::error("mailc::arguments", what).at(extra.span()).help(usage(name)));
            return None;
        }
        Some(())
    }
}

fn usage(name: &str) -> String {
    let u = match name {
        "accept" | "discard" | "stop" | "callahead" => format!("`{name}` takes no arguments"),
        "reject" => "reject [CODE] [ENHANCED] [\"TEXT\"], e.g. reject 550 5.7.1 \"Relay access denied\"".into(),
        "tempfail" => "tempfail [CODE] [ENHANCED] [\"TEXT\"], e.g. tempfail 451 4.7.1 \"Try again later\"".into(),
        "deliver" | "filter" => format!("{name} mx | smtp \"HOST\" | lmtp \"HOST:PORT\" | maildir [\"FOLDER\"] | mbox \"FILE\" [:tls required|may|none] [:auth SECRET]"),
        other => match TESTS.iter().find(|t| t.0 == other) {
            Some((_, u)) => format!("usage: {u}"),
            None => "see spec/language.md for its arguments".into(),
        },
    };
    u
}
