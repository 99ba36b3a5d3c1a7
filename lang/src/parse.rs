//! Parsing: the pest grammar to the AST, and pest's errors to plain words.
//!
//! A file that parses is read by pest in one go. A file that does not is read again one
//! declaration and one statement at a time ([`parse_recovering`]): the file is cut into
//! declarations and statements at their `;` and `}` (see [`crate::syntax`]), each piece is
//! parsed alone, and a piece that fails gives its own diagnostic while the pieces around
//! it still make the AST. So a file with several syntax errors reports each of them, and
//! the checker still runs on what parsed.

use std::collections::HashSet;

use pest::iterators::Pair;
use pest::Parser;

use crate::ast::*;
use crate::diag::Diagnostic;
use crate::source::{FileId, Span};
use crate::syntax::{self, Kind, Token, Tree};

mod errors;
use errors::*;

#[derive(pest_derive::Parser)]
#[grammar = "grammar.pest"]
struct PolicyParser;

/// Nesting deeper than this is refused before it can exhaust the stack.
pub const MAX_NESTING: usize = 64;

/// Parse one file. On a syntax error, returns the first diagnostic [`parse_recovering`] gives.
pub fn parse_file(file: FileId, text: &str) -> Result<File, Diagnostic> {
    let mut p = parse_recovering(file, text);
    if p.errors.is_empty() {
        Ok(p.file)
    } else {
        Err(p.errors.remove(0))
    }
}

/// What the statements and declarations that did not parse would have declared, so that
/// the checker does not report their uses as undefined.
#[derive(Clone, Debug, Default)]
pub struct Unparsed {
    /// Names of lists, tables, secrets, scanners and rules blocks, and variables set.
    pub names: HashSet<String>,
    /// A `require` did not parse: any capability may have been required.
    pub require: bool,
    /// An `include` did not parse: any name may have been declared.
    pub include: bool,
}

/// A parse that goes on after syntax errors.
#[derive(Debug)]
pub struct Parsed {
    /// Every declaration and statement that parsed.
    pub file: File,
    /// The syntax errors, in file order (empty when the file parsed).
    pub errors: Vec<Diagnostic>,
    pub unparsed: Unparsed,
}

/// Parse one file, recovering from syntax errors at the next declaration or statement.
/// A nesting deeper than [`MAX_NESTING`] is reported alone, with no AST.
pub fn parse_recovering(file: FileId, text: &str) -> Parsed {
    let empty = |errors| Parsed { file: File { items: Vec::new() }, errors, unparsed: Unparsed::default() };
    if let Some(pos) = too_deep(text) {
        return empty(vec![Diagnostic::error("mailc::limit", format!("nesting deeper than {MAX_NESTING} levels"))
            .at(Span::new(file, pos, pos + 1))
            .help("split the condition or the block into smaller rules")]);
    }
    match PolicyParser::parse(Rule::file, text) {
        Ok(mut pairs) => {
            let Some(root) = pairs.next() else {
                return empty(vec![Diagnostic::error("mailc::syntax", "empty parse")]);
            };
            let b = Builder { file, offset: 0 };
            let mut items = Vec::new();
            for p in root.into_inner() {
                if p.as_rule() == Rule::EOI {
                    break;
                }
                items.push(b.item(p));
            }
            Parsed { file: File { items }, errors: Vec::new(), unparsed: Unparsed::default() }
        }
        Err(e) => {
            let first = syntax_error(file, text, e);
            let mut r =
                Recovery { file, text, toks: syntax::lex(text), errors: Vec::new(), unparsed: Unparsed::default() };
            let trees = syntax::tree(text, &r.toks, true);
            let items = r.items(&trees);
            let mut errors = r.errors;
            errors.sort_by_key(|d| d.span.map(|s| (s.start, s.end)));
            errors.dedup_by(|a, b| a.span == b.span && a.message == b.message);
            // The whole file's parse goes furthest into the first error's context, so its
            // words for that error stand (they are the ones a single-error run always gave).
            match errors.iter().position(|d| d.span.map(|s| s.start) == first.span.map(|s| s.start)) {
                Some(i) => {
                    let related = std::mem::take(&mut errors[i].related);
                    errors[i] = first;
                    if errors[i].related.is_empty() {
                        errors[i].related = related;
                    }
                }
                None => {
                    let at = errors.partition_point(|d| d.span.map(|s| s.start) < first.span.map(|s| s.start));
                    errors.insert(at, first);
                }
            }
            Parsed { file: File { items }, errors, unparsed: r.unparsed }
        }
    }
}

/// The piece-by-piece parse behind [`parse_recovering`].
struct Recovery<'t> {
    file: FileId,
    text: &'t str,
    toks: Vec<Token>,
    errors: Vec<Diagnostic>,
    unparsed: Unparsed,
}

/// Which grammar rule a piece is parsed with.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Piece {
    Item,
    Stmt,
    Opt,
}

impl<'t> Recovery<'t> {
    fn tok_text(&self, i: usize) -> &'t str {
        self.toks[i].text(self.text)
    }

    fn try_parse<R>(
        &mut self,
        piece: Piece,
        src: &str,
        offset: usize,
        build: impl FnOnce(&Builder, Pair<Rule>) -> R,
    ) -> Result<R, Diagnostic> {
        let rule = match piece {
            Piece::Item => Rule::item_only,
            Piece::Stmt => Rule::stmt_only,
            Piece::Opt => Rule::option_only,
        };
        match PolicyParser::parse(rule, src) {
            Ok(mut pairs) => {
                let b = Builder { file: self.file, offset };
                let outer = pairs.next().ok_or_else(|| Diagnostic::error("mailc::syntax", "empty parse"))?;
                let inner = outer
                    .into_inner()
                    .find(|p| p.as_rule() != Rule::EOI)
                    .ok_or_else(|| Diagnostic::error("mailc::syntax", "empty parse"))?;
                Ok(build(&b, inner))
            }
            Err(e) => {
                let (pos, mut positives) = error_parts(&e);
                // At the start of a declaration, the whole file could also have ended.
                let at_start = src[..pos.min(src.len())].trim().is_empty();
                if piece == Piece::Item && at_start {
                    positives.insert(0, Rule::EOI);
                }
                Err(syntax_error_at(
                    self.file,
                    self.text,
                    offset + pos,
                    &positives,
                    !(piece == Piece::Item && at_start),
                ))
            }
        }
    }

    /// The text of trees `kids`, with the inside of their own `{ }` groups blanked when
    /// `blank` is set (so a piece's own structure can be parsed apart from its blocks).
    fn piece_text(&self, kids: &[Tree], blank: bool) -> Option<(String, usize)> {
        let (start, _) = syntax::range(&self.toks, kids)?;
        // The piece runs to the next token, as the whole file's parse would see it.
        let last = kids.last()?.last();
        let end = self.toks.get(last + 1).map_or(self.text.len(), |t| t.start as usize);
        let mut bytes = self.text.as_bytes()[start..end].to_vec();
        if blank {
            for k in kids {
                if let Tree::Group { open, close, .. } = k {
                    if self.tok_text(*open) == "{" {
                        let a = self.toks[*open].end as usize - start;
                        let b = close.map_or(end, |c| self.toks[c].start as usize) - start;
                        for byte in &mut bytes[a..b] {
                            *byte = b' ';
                        }
                    }
                }
            }
        }
        // Only ASCII bytes were replaced, and only inside whole characters' runs.
        String::from_utf8(bytes).ok().map(|s| (s, start))
    }

    /// Point at the `{` of a block that is never closed.
    fn note_unclosed(&self, kids: &[Tree], d: Diagnostic) -> Diagnostic {
        for k in kids {
            if let Tree::Group { open, close: None, .. } = k {
                if self.tok_text(*open) == "{" {
                    let t = &self.toks[*open];
                    let span = Span::new(self.file, t.start as usize, t.end as usize);
                    return d.related(span, "this block is never closed: add `}` at its end");
                }
            }
        }
        d
    }

    fn groups<'k>(&self, kids: &'k [Tree]) -> Vec<&'k [Tree]> {
        kids.iter()
            .filter_map(|k| match k {
                Tree::Group { open, kids, .. } if self.tok_text(*open) == "{" => Some(kids.as_slice()),
                _ => None,
            })
            .collect()
    }

    fn first_word(&self, kids: &[Tree]) -> Option<&'t str> {
        match kids.first()? {
            Tree::Tok(i) if self.toks[*i].kind == Kind::Word => Some(self.tok_text(*i)),
            _ => None,
        }
    }

    fn second_word(&self, kids: &[Tree]) -> Option<&'t str> {
        match kids.get(1)? {
            Tree::Tok(i) if self.toks[*i].kind == Kind::Word => Some(self.tok_text(*i)),
            _ => None,
        }
    }

    /// Split `kids` before every tree that starts a line and whose first word is one of
    /// `words` (the first tree excepted).
    fn split_at_lines(&self, kids: &'_ [Tree], words: &[&str]) -> Vec<(usize, usize)> {
        let mut cuts = vec![0];
        for (i, k) in kids.iter().enumerate().skip(1) {
            if let Tree::Tok(t) = k {
                if self.toks[*t].kind == Kind::Word
                    && syntax::starts_line(&self.toks, *t)
                    && words.contains(&self.tok_text(*t))
                {
                    cuts.push(i);
                }
            }
        }
        cuts.push(kids.len());
        cuts.windows(2).map(|w| (w[0], w[1])).collect()
    }

    // ---- top level ------------------------------------------------------------------

    fn items(&mut self, trees: &[Tree]) -> Vec<Item> {
        let mut out = Vec::new();
        for (a, b) in syntax::statements(self.text, &self.toks, trees, true) {
            self.item_piece(&trees[a..b], true, &mut out);
        }
        out
    }

    fn item_piece(&mut self, kids: &[Tree], may_split: bool, out: &mut Vec<Item>) {
        let Some((src, offset)) = self.piece_text(kids, false) else { return };
        let err = match self.try_parse(Piece::Item, &src, offset, |b, p| b.item(p)) {
            Ok(item) => {
                out.push(item);
                return;
            }
            Err(e) => e,
        };
        if may_split {
            let parts = self.split_at_lines(kids, syntax::TOP_KEYWORDS);
            if parts.len() > 1 {
                for (a, b) in parts {
                    self.item_piece(&kids[a..b], false, out);
                }
                return;
            }
        }
        let first = self.first_word(kids);
        match first {
            Some("on" | "route" | "rules") if !self.groups(kids).is_empty() => {
                let Some((blanked, offset)) = self.piece_text(kids, true) else { return };
                match self.try_parse(Piece::Item, &blanked, offset, |b, p| b.item(p)) {
                    Ok(mut item) => {
                        let body = self.groups(kids).first().map(|g| self.block(g)).unwrap_or_default();
                        match &mut item {
                            Item::Stage { body: b, .. } | Item::Rules { body: b, .. } => *b = body,
                            _ => {}
                        }
                        out.push(item);
                    }
                    Err(e) => {
                        let e = self.note_unclosed(kids, e);
                        if first == Some("rules") {
                            if let Some(n) = self.second_word(kids) {
                                self.unparsed.names.insert(n.to_string());
                            }
                        }
                        self.errors.push(e);
                    }
                }
            }
            Some("server" | "listener" | "table" | "secret" | "scanner" | "mailing_list")
                if !self.groups(kids).is_empty() =>
            {
                // The settings are parsed one by one, so each broken one is reported; the
                // block itself is left out (a setting missing from it is no new error).
                if let Some(n) = self.second_word(kids).filter(|_| first != Some("server")) {
                    self.unparsed.names.insert(n.to_string());
                }
                let before = self.errors.len();
                if let Some((blanked, offset)) = self.piece_text(kids, true) {
                    if let Err(e) = self.try_parse(Piece::Item, &blanked, offset, |_, _| ()) {
                        let e = self.note_unclosed(kids, e);
                        self.errors.push(e);
                    }
                }
                for g in self.groups(kids) {
                    for (a, b) in syntax::statements(self.text, &self.toks, g, false) {
                        if let Some((src, offset)) = self.piece_text(&g[a..b], false) {
                            if let Err(e) = self.try_parse(Piece::Opt, &src, offset, |_, _| ()) {
                                self.errors.push(e);
                            }
                        }
                    }
                }
                if self.errors.len() == before {
                    self.errors.push(err);
                }
            }
            _ => {
                match first {
                    Some("list" | "table" | "secret" | "scanner" | "mailing_list" | "rules") => {
                        if let Some(n) = self.second_word(kids) {
                            self.unparsed.names.insert(n.to_string());
                        }
                    }
                    Some("require") => self.unparsed.require = true,
                    Some("include") => self.unparsed.include = true,
                    _ => {}
                }
                self.errors.push(err);
            }
        }
    }

    // ---- blocks ---------------------------------------------------------------------

    fn block(&mut self, kids: &[Tree]) -> Vec<Stmt> {
        let mut out = Vec::new();
        for (a, b) in syntax::statements(self.text, &self.toks, kids, false) {
            self.stmt_piece(&kids[a..b], true, &mut out);
        }
        out
    }

    fn stmt_piece(&mut self, kids: &[Tree], may_split: bool, out: &mut Vec<Stmt>) {
        let Some((src, offset)) = self.piece_text(kids, false) else { return };
        let err = match self.try_parse(Piece::Stmt, &src, offset, |b, p| b.stmt(p)) {
            Ok(s) => {
                out.push(s);
                return;
            }
            Err(e) => e,
        };
        if may_split {
            let parts = self.split_at_lines(kids, &["if"]);
            if parts.len() > 1 {
                for (a, b) in parts {
                    self.stmt_piece(&kids[a..b], false, out);
                }
                return;
            }
        }
        match self.first_word(kids) {
            Some("if") => {
                let groups = self.groups(kids);
                let Some((blanked, offset)) = self.piece_text(kids, true) else { return };
                match self.try_parse(Piece::Stmt, &blanked, offset, |b, p| b.stmt(p)) {
                    Ok(Stmt::If { mut arms, mut otherwise, span })
                        if groups.len() == arms.len() + usize::from(otherwise.is_some()) =>
                    {
                        for (arm, g) in arms.iter_mut().zip(&groups) {
                            arm.1 = self.block(g);
                        }
                        if let (Some(o), Some(g)) = (otherwise.as_mut(), groups.last()) {
                            *o = self.block(g);
                        }
                        out.push(Stmt::If { arms, otherwise, span });
                    }
                    Ok(_) => self.errors.push(err),
                    Err(e) => {
                        let e = self.note_unclosed(kids, e);
                        self.errors.push(e);
                        // The condition or the arms are broken; their blocks are still checked.
                        for g in groups {
                            let body = self.block(g);
                            if let (Some(first), Some(last)) = (body.first(), body.last()) {
                                let span = first.span().to(last.span());
                                out.push(Stmt::If {
                                    arms: vec![(Cond::And(Vec::new(), span), body)],
                                    otherwise: None,
                                    span,
                                });
                            }
                        }
                    }
                }
            }
            Some("set" | "unset") => {
                if let Some(n) = self.second_word(kids) {
                    self.unparsed.names.insert(n.to_string());
                }
                self.errors.push(err);
            }
            _ => self.errors.push(err),
        }
    }
}

/// Bracket depth check so that the recursive-descent parser and the checker never recurse
/// without bound on hostile input.
fn too_deep(text: &str) -> Option<usize> {
    let mut depth = 0usize;
    let mut in_str = false;
    let mut in_comment = false;
    let mut escape = false;
    for (i, b) in text.bytes().enumerate() {
        if in_comment {
            in_comment = b != b'\n';
            continue;
        }
        if in_str {
            if escape {
                escape = false;
            } else if b == b'\\' {
                escape = true;
            } else if b == b'"' || b == b'\n' {
                in_str = false;
            }
            continue;
        }
        match b {
            b'#' => in_comment = true,
            b'"' => in_str = true,
            b'{' | b'(' | b'[' => {
                depth += 1;
                if depth > MAX_NESTING {
                    return Some(i);
                }
            }
            b'}' | b')' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    // `not not not ...` chains recurse too; only a chain of `not`s nests, however many
    // separate `not`s (`x not in y`) a policy holds.
    let mut run = 0usize;
    let mut word_start = None;
    for (i, c) in text.char_indices().chain([(text.len(), ' ')]) {
        if c.is_ascii_alphanumeric() || c == '_' {
            word_start.get_or_insert(i);
            continue;
        }
        if let Some(start) = word_start.take() {
            if &text[start..i] == "not" {
                run += 1;
                if run > MAX_NESTING {
                    return Some(start);
                }
            } else {
                run = 0;
            }
        }
        if !c.is_whitespace() {
            run = 0;
        }
    }
    None
}

struct Builder {
    file: FileId,
    /// Byte offset of the parsed text in the file (recovery parses pieces of it).
    offset: usize,
}

impl Builder {
    fn span(&self, p: &Pair<Rule>) -> Span {
        let s = p.as_span();
        Span::new(self.file, self.offset + s.start(), self.offset + s.end())
    }

    fn ident(&self, p: Pair<Rule>) -> Ident {
        Ident { name: p.as_str().to_string(), span: self.span(&p) }
    }

    fn item(&self, p: Pair<Rule>) -> Item {
        let span = self.span(&p);
        let rule = p.as_rule();
        let mut inner = p.into_inner().filter(|p| !is_punct(p.as_rule()));
        match rule {
            Rule::require => {
                inner.next(); // keyword
                let v = inner.next().map(|p| self.value(p));
                let caps = match v.map(|v| v.kind) {
                    Some(ValueKind::Str(s)) => vec![s],
                    Some(ValueKind::List(items)) => items
                        .into_iter()
                        .filter_map(|v| match v.kind {
                            ValueKind::Str(s) => Some(s),
                            _ => None,
                        })
                        .collect(),
                    _ => Vec::new(),
                };
                Item::Require { caps, span }
            }
            Rule::include => {
                inner.next();
                let path = inner.next().map(|p| self.strlit(p)).unwrap_or(StrLit { raw: String::new(), span });
                Item::Include { path, span }
            }
            Rule::list_decl => {
                inner.next();
                let name = self.ident(inner.next().expect("grammar: list name"));
                let mut kind = ListKind::Strings;
                let mut items = Vec::new();
                for p in inner {
                    match p.as_rule() {
                        Rule::list_kind => {
                            kind = match p.as_str() {
                                "domains" => ListKind::Domains,
                                "cidr" => ListKind::Cidr,
                                _ => ListKind::Strings,
                            }
                        }
                        Rule::str_list => {
                            if let ValueKind::List(v) = self.value(p).kind {
                                items = v;
                            }
                        }
                        _ => {}
                    }
                }
                Item::List { name, kind, items, span }
            }
            Rule::resource_decl => {
                let kw = match inner.next().map(|p| p.as_str().to_string()).as_deref() {
                    Some("secret") => ResourceKw::Secret,
                    Some("scanner") => ResourceKw::Scanner,
                    Some("mailing_list") => ResourceKw::MailingList,
                    _ => ResourceKw::Table,
                };
                let name = self.ident(inner.next().expect("grammar: resource name"));
                let kind = self.ident(inner.next().expect("grammar: resource kind"));
                let mut source = None;
                let mut options = Vec::new();
                for p in inner {
                    match p.as_rule() {
                        Rule::string => source = Some(self.strlit(p)),
                        Rule::options => options = self.options(p),
                        _ => {}
                    }
                }
                Item::Resource { kw, name, kind, source, options, span }
            }
            Rule::settings => {
                let kw = match inner.next().map(|p| p.as_str().to_string()).as_deref() {
                    Some("listener") => SettingsKw::Listener,
                    _ => SettingsKw::Server,
                };
                let mut name = None;
                let mut options = Vec::new();
                for p in inner {
                    match p.as_rule() {
                        Rule::ident => name = Some(self.ident(p)),
                        Rule::options => options = self.options(p),
                        _ => {}
                    }
                }
                Item::Settings { kw, name, options, span }
            }
            Rule::rules_decl => {
                inner.next();
                let name = self.ident(inner.next().expect("grammar: rules name"));
                let body = inner.next().map(|b| self.block(b)).unwrap_or_default();
                Item::Rules { name, body, span }
            }
            Rule::stage_block => {
                let first = inner.next().expect("grammar: stage keyword");
                let stage = if first.as_rule() == Rule::kw_route {
                    self.ident(first)
                } else {
                    self.ident(inner.next().expect("grammar: stage name"))
                };
                let body = inner.next().map(|b| self.block(b)).unwrap_or_default();
                Item::Stage { stage, body, span }
            }
            r => unreachable!("grammar: unexpected item {r:?}"),
        }
    }

    fn options(&self, p: Pair<Rule>) -> Vec<Opt> {
        p.into_inner()
            .filter(|p| p.as_rule() == Rule::option)
            .map(|o| {
                let span = self.span(&o);
                let mut inner = o.into_inner().filter(|p| !is_punct(p.as_rule()));
                let name = self.ident(inner.next().expect("grammar: option name"));
                let value =
                    inner.next().map(|v| self.value(v)).unwrap_or(Value { kind: ValueKind::Path(String::new()), span });
                Opt { name, value, span }
            })
            .collect()
    }

    fn block(&self, p: Pair<Rule>) -> Vec<Stmt> {
        p.into_inner().filter(|p| !is_punct(p.as_rule())).map(|s| self.stmt(s)).collect()
    }

    fn stmt(&self, p: Pair<Rule>) -> Stmt {
        let span = self.span(&p);
        match p.as_rule() {
            Rule::if_stmt => {
                let mut arms = Vec::new();
                let mut otherwise = None;
                let mut inner = p.into_inner().filter(|p| !is_punct(p.as_rule()));
                inner.next(); // if
                let cond = self.cond(inner.next().expect("grammar: if condition"));
                let body = self.block(inner.next().expect("grammar: if block"));
                arms.push((cond, body));
                for arm in inner {
                    match arm.as_rule() {
                        Rule::elsif_arm => {
                            let mut a = arm.into_inner().filter(|p| !is_punct(p.as_rule()));
                            a.next();
                            let c = self.cond(a.next().expect("grammar: elsif condition"));
                            let b = self.block(a.next().expect("grammar: elsif block"));
                            arms.push((c, b));
                        }
                        Rule::else_arm => {
                            let mut a = arm.into_inner().filter(|p| !is_punct(p.as_rule()));
                            a.next();
                            otherwise = Some(self.block(a.next().expect("grammar: else block")));
                        }
                        _ => {}
                    }
                }
                Stmt::If { arms, otherwise, span }
            }
            Rule::action => {
                let mut inner = p.into_inner().filter(|p| !is_punct(p.as_rule()) || p.as_rule() == Rule::eq);
                let name = self.ident(inner.next().expect("grammar: action name"));
                let args = inner.map(|a| self.arg(a)).collect();
                Stmt::Action { name, args, span }
            }
            r => unreachable!("grammar: unexpected statement {r:?}"),
        }
    }

    fn arg(&self, p: Pair<Rule>) -> Arg {
        match p.as_rule() {
            Rule::tag => Arg::Tag(Ident { name: p.as_str()[1..].to_string(), span: self.span(&p) }),
            Rule::eq => Arg::Eq(self.span(&p)),
            _ => Arg::Value(self.value(p)),
        }
    }

    fn cond(&self, p: Pair<Rule>) -> Cond {
        let span = self.span(&p);
        match p.as_rule() {
            Rule::cond | Rule::conj => {
                let is_or = p.as_rule() == Rule::cond;
                let mut parts: Vec<Cond> = p
                    .into_inner()
                    .filter(|p| !matches!(p.as_rule(), Rule::kw_or | Rule::kw_and))
                    .map(|c| self.cond(c))
                    .collect();
                if parts.len() == 1 {
                    parts.pop().expect("one part")
                } else if is_or {
                    Cond::Or(parts, span)
                } else {
                    Cond::And(parts, span)
                }
            }
            Rule::neg => {
                let mut inner = p.into_inner().filter(|p| !is_punct(p.as_rule()));
                let first = inner.next().expect("grammar: neg");
                if first.as_rule() == Rule::kw_not {
                    let c = self.cond(inner.next().expect("grammar: not operand"));
                    Cond::Not(Box::new(c), span)
                } else {
                    self.cond(first)
                }
            }
            Rule::allof | Rule::anyof => {
                let is_all = p.as_rule() == Rule::allof;
                let parts: Vec<Cond> =
                    p.into_inner().filter(|p| matches!(p.as_rule(), Rule::cond)).map(|c| self.cond(c)).collect();
                if is_all {
                    Cond::And(parts, span)
                } else {
                    Cond::Or(parts, span)
                }
            }
            Rule::test => {
                let mut inner = p.into_inner();
                let term = self.term(inner.next().expect("grammar: term"));
                let mut op = None;
                let mut operand = None;
                for q in inner {
                    match q.as_rule() {
                        Rule::null_op => {
                            let s = self.span(&q);
                            let o = q.into_inner().next().map(|x| x.as_rule());
                            op = Some((if o == Some(Rule::is_not_null) { Op::IsNotNull } else { Op::IsNull }, s));
                        }
                        Rule::op => {
                            let s = self.span(&q);
                            let o = q.into_inner().next().expect("grammar: op");
                            let kind = match o.as_rule() {
                                Rule::kw_in => Op::In,
                                Rule::not_in => Op::NotIn,
                                Rule::match_op => match o.as_str() {
                                    ":is" => Op::Is,
                                    ":contains" => Op::Contains,
                                    ":matches" => Op::Matches,
                                    _ => Op::Regex,
                                },
                                _ => match o.as_str() {
                                    "==" => Op::Eq,
                                    "!=" => Op::Ne,
                                    "<" => Op::Lt,
                                    "<=" => Op::Le,
                                    ">" => Op::Gt,
                                    _ => Op::Ge,
                                },
                            };
                            op = Some((kind, s));
                        }
                        Rule::operand => {
                            operand = q.into_inner().next().map(|v| self.value(v));
                        }
                        _ => {}
                    }
                }
                Cond::Test { term, op, operand, span }
            }
            // parenthesised condition
            _ => {
                let inner = p.into_inner().find(|p| p.as_rule() == Rule::cond);
                match inner {
                    Some(c) => self.cond(c),
                    None => Cond::And(Vec::new(), span),
                }
            }
        }
    }

    fn term(&self, p: Pair<Rule>) -> Term {
        let span = self.span(&p);
        let mut inner = p.into_inner();
        let name = self.ident(inner.next().expect("grammar: term name"));
        let args = inner.map(|a| self.arg(a)).collect();
        Term { name, args, span }
    }

    fn strlit(&self, p: Pair<Rule>) -> StrLit {
        let span = self.span(&p);
        let raw = p.into_inner().next().map(|i| i.as_str().to_string()).unwrap_or_default();
        StrLit { raw, span }
    }

    fn value(&self, p: Pair<Rule>) -> Value {
        let span = self.span(&p);
        let text = p.as_str();
        let kind = match p.as_rule() {
            Rule::string => ValueKind::Str(self.strlit(p)),
            Rule::number => ValueKind::Num(text.parse().unwrap_or(f64::MAX)),
            Rule::size => {
                let (n, unit) = text.split_at(text.len() - 1);
                let mult: u64 = match unit {
                    "K" => 1 << 10,
                    "M" => 1 << 20,
                    _ => 1 << 30,
                };
                ValueKind::Size(n.parse::<u64>().unwrap_or(u64::MAX).saturating_mul(mult))
            }
            Rule::duration => {
                let digits = text.trim_end_matches(|c: char| c.is_ascii_alphabetic());
                let unit = &text[digits.len()..];
                let mult: u64 = match unit {
                    "ms" => 1,
                    "s" => 1000,
                    "m" => 60_000,
                    "h" => 3_600_000,
                    "d" => 86_400_000,
                    _ => 7 * 86_400_000,
                };
                ValueKind::Duration(digits.parse::<u64>().unwrap_or(u64::MAX).saturating_mul(mult))
            }
            Rule::enh_code => {
                let mut it = text.split('.').map(|n| n.parse::<u16>().unwrap_or(u16::MAX));
                ValueKind::Enh(it.next().unwrap_or(0), it.next().unwrap_or(0), it.next().unwrap_or(0))
            }
            Rule::str_list => {
                ValueKind::List(p.into_inner().filter(|p| !is_punct(p.as_rule())).map(|v| self.value(v)).collect())
            }
            _ => ValueKind::Path(text.to_string()),
        };
        Value { kind, span }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn whole(text: &str) -> Option<Diagnostic> {
        PolicyParser::parse(Rule::file, text).err().map(|e| syntax_error(FileId(0), text, e))
    }

    fn same(text: &str) {
        if too_deep(text).is_some() {
            return;
        }
        let Some(want) = whole(text) else { return };
        let got = parse_recovering(FileId(0), text);
        let first = got.errors.first().unwrap_or_else(|| panic!("no error for {text:?}"));
        assert_eq!(
            (first.span, &first.message, &first.help),
            (want.span, &want.message, &want.help),
            "first recovered error differs for {text:?}"
        );
    }

    /// The first error of the recovering parse is the one the whole file's parse gives, on
    /// every case of the corpus and every prefix of the policy that uses everything.
    #[test]
    fn first_error_is_unchanged() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/check");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).expect("tests/check") {
            let p = e.expect("entry").path();
            if p.extension().is_some_and(|x| x == "mailpolicy") {
                same(&std::fs::read_to_string(&p).expect("read"));
                n += 1;
            }
        }
        assert!(n > 50);
        // Every prefix that ends at a token's end, or one byte into a string or a comment.
        let all = std::fs::read_to_string(dir.join("clean_everything.mailpolicy")).expect("read");
        let mut cuts: Vec<usize> = syntax::lex(&all)
            .iter()
            .flat_map(|t| {
                let inside = matches!(t.kind, Kind::Str(_) | Kind::Comment).then_some(t.start as usize + 1);
                [Some(t.end as usize), inside].into_iter().flatten()
            })
            .collect();
        cuts.dedup();
        for i in cuts {
            if let Some(prefix) = all.get(..i) {
                same(prefix);
            }
        }
    }

    #[test]
    fn several_errors_each_reported() {
        let text = "on connect {\n  reject 554 \"a\"\n}\non rcpt {\n  if x && y { reject; }\n  accept;\n}\nlist l = [\"a\" \"b\"];\n";
        let p = parse_recovering(FileId(0), text);
        let lines: Vec<u32> = p.errors.iter().map(|d| d.span.map_or(0, |s| s.start)).collect();
        assert_eq!(p.errors.len(), 3, "{:?}", p.errors);
        assert!(lines.windows(2).all(|w| w[0] < w[1]));
        // Both stages are there, the rcpt one with its broken `if` as a placeholder and `accept`.
        assert_eq!(p.file.items.len(), 2);
        assert!(p.unparsed.names.contains("l"));
    }
}
