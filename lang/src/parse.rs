//! Parsing: the pest grammar to the AST, and pest's errors to plain words.

use pest::iterators::Pair;
use pest::Parser;

use crate::ast::*;
use crate::diag::Diagnostic;
use crate::source::{FileId, Span};

#[derive(pest_derive::Parser)]
#[grammar = "grammar.pest"]
struct PolicyParser;

/// Nesting deeper than this is refused before it can exhaust the stack.
pub const MAX_NESTING: usize = 64;

/// Parse one file. On a syntax error, returns the one diagnostic pest's furthest failure gives.
pub fn parse_file(file: FileId, text: &str) -> Result<File, Diagnostic> {
    if let Some(pos) = too_deep(text) {
        return Err(Diagnostic::error("mailc::limit", format!("nesting deeper than {MAX_NESTING} levels"))
            .at(Span::new(file, pos, pos + 1))
            .help("split the condition or the block into smaller rules"));
    }
    let mut pairs = PolicyParser::parse(Rule::file, text).map_err(|e| syntax_error(file, text, e))?;
    let root = pairs.next().ok_or_else(|| Diagnostic::error("mailc::syntax", "empty parse"))?;
    let b = Builder { file };
    let mut items = Vec::new();
    for p in root.into_inner() {
        if p.as_rule() == Rule::EOI {
            break;
        }
        items.push(b.item(p));
    }
    Ok(File { items })
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
}

impl Builder {
    fn span(&self, p: &Pair<Rule>) -> Span {
        let s = p.as_span();
        Span::new(self.file, s.start(), s.end())
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

fn is_punct(r: Rule) -> bool {
    matches!(
        r,
        Rule::semi
            | Rule::eq
            | Rule::comma
            | Rule::lbrace
            | Rule::rbrace
            | Rule::lparen
            | Rule::rparen
            | Rule::lbrack
            | Rule::rbrack
    )
}

/// Plain-words name of a grammar rule, for "expected ..." messages.
fn describe(rule: Rule) -> Option<&'static str> {
    Some(match rule {
        Rule::semi => "`;`",
        Rule::eq => "`=`",
        Rule::comma => "`,`",
        Rule::lbrace => "`{`",
        Rule::rbrace => "`}`",
        Rule::lparen => "`(`",
        Rule::rparen => "`)`",
        Rule::lbrack => "`[`",
        Rule::rbrack => "`]`",
        Rule::string | Rule::str_inner => "a string",
        Rule::str_list => "a list `[...]`",
        Rule::ident => "a name",
        Rule::path => "a name",
        Rule::number => "a number",
        Rule::duration => "a duration",
        Rule::size => "a size",
        Rule::enh_code => "an enhanced status code",
        Rule::tag => "a `:tag`",
        Rule::cond | Rule::conj | Rule::neg | Rule::test | Rule::term => "a condition",
        Rule::op | Rule::match_op | Rule::cmp_op | Rule::kw_in | Rule::not_in => "a comparison",
        Rule::null_op | Rule::is_null | Rule::is_not_null => "`is null`",
        Rule::operand => "a value to compare with",
        Rule::kw_null => "`null`",
        Rule::kw_not => "`not`",
        Rule::kw_and => "`and`",
        Rule::kw_or => "`or`",
        Rule::block => "a block `{ ... }`",
        Rule::stmt | Rule::action | Rule::if_stmt => "a statement",
        Rule::elsif_arm | Rule::kw_elsif => "`elsif`",
        Rule::else_arm | Rule::kw_else => "`else`",
        Rule::options => "a settings block `{ ... }`",
        Rule::option => "a setting",
        Rule::list_kind => "a list kind (`domains`, `cidr` or `strings`)",
        Rule::item
        | Rule::require
        | Rule::include
        | Rule::list_decl
        | Rule::resource_decl
        | Rule::settings
        | Rule::rules_decl
        | Rule::stage_block
        | Rule::kw_require
        | Rule::kw_include
        | Rule::kw_list
        | Rule::kw_rules
        | Rule::kw_on
        | Rule::kw_route
        | Rule::resource_kw
        | Rule::settings_kw => "a declaration or a stage block (`on connect { ... }`)",
        Rule::EOI => "the end of the file",
        _ => return None,
    })
}

fn syntax_error(file: FileId, text: &str, e: pest::error::Error<Rule>) -> Diagnostic {
    let pos = match e.location {
        pest::error::InputLocation::Pos(p) => p,
        pest::error::InputLocation::Span((s, _)) => s,
    };
    let mut expected: Vec<&'static str> = Vec::new();
    if let pest::error::ErrorVariant::ParsingError { positives, .. } = &e.variant {
        for r in positives {
            if let Some(d) = describe(*r) {
                if !expected.contains(&d) {
                    expected.push(d);
                }
            }
        }
    }
    let found = found_token(text, pos);
    // A string that runs into the end of its line fails as a whole at its opening quote;
    // "expected `;`" there would send the reader looking in the wrong place.
    if text[pos.min(text.len())..].starts_with('"') && !string_closes(&text[pos + 1..]) {
        let line_end = text[pos..].find('\n').map_or(text.len(), |n| pos + n);
        return Diagnostic::error("mailc::syntax", "this string is never closed")
            .at(Span::new(file, pos, line_end))
            .label("the string starts here")
            .help(
                "close it with `\"` on the same line: a string cannot span lines; write `\\\"` for a quote inside it",
            );
    }
    let wants_semi = expected.contains(&"`;`");
    // A missing `;` is best reported right after the previous token, where it belongs.
    if wants_semi {
        let prev_end = prev_token_end(text, pos);
        let what = statement_kind(text, prev_end);
        let mut d = Diagnostic::error("mailc::syntax", format!("expected `;` after the {what}"))
            .at(Span::new(file, prev_end, prev_end))
            .label("`;` goes here");
        if let Some(f) = &found {
            d = d.help(format!("every {what} ends with `;`; found {f} instead"));
        }
        return d;
    }
    let list = join_alternatives(&expected);
    let found_text = found.clone().unwrap_or_else(|| "the end of the file".to_string());
    let msg = if list.is_empty() {
        format!("unexpected {found_text}")
    } else {
        format!("expected {list}, found {found_text}")
    };
    let end = (pos + found.as_ref().map(|_| token_len(text, pos)).unwrap_or(0)).min(text.len());
    let mut d = Diagnostic::error("mailc::syntax", msg).at(Span::new(file, pos, end.max(pos)));
    if let Some(h) = hint_for(text, pos, &expected) {
        d = d.help(h);
    }
    d
}

/// Whether a string whose opening quote was just passed ends on this line.
fn string_closes(rest: &str) -> bool {
    let mut esc = false;
    for c in rest.chars() {
        match c {
            '\n' => return false,
            _ if esc => esc = false,
            '\\' => esc = true,
            '"' => return true,
            _ => {}
        }
    }
    false
}

/// Offset just after the last of `delims` in `text` outside strings and comments.
fn after_last_delim(text: &str, delims: &[char]) -> usize {
    let mut last = 0;
    let mut in_str = false;
    let mut in_comment = false;
    let mut esc = false;
    for (i, c) in text.char_indices() {
        if in_comment {
            in_comment = c != '\n';
        } else if in_str {
            if esc {
                esc = false;
            } else if c == '\\' {
                esc = true;
            } else if c == '"' || c == '\n' {
                in_str = false;
            }
        } else if c == '#' {
            in_comment = true;
        } else if c == '"' {
            in_str = true;
        } else if delims.contains(&c) {
            last = i + 1;
        }
    }
    last
}

fn join_alternatives(items: &[&str]) -> String {
    match items.len() {
        0 => String::new(),
        1 => items[0].to_string(),
        n => format!("{} or {}", items[..n - 1].join(", "), items[n - 1]),
    }
}

fn token_len(text: &str, pos: usize) -> usize {
    let rest = &text[pos.min(text.len())..];
    let mut chars = rest.chars();
    match chars.next() {
        None => 0,
        Some(c) if c.is_alphanumeric() || c == '_' => {
            rest.find(|c: char| !(c.is_alphanumeric() || c == '_' || c == '.')).unwrap_or(rest.len())
        }
        Some(c) => c.len_utf8(),
    }
}

fn found_token(text: &str, pos: usize) -> Option<String> {
    let len = token_len(text, pos);
    if len == 0 {
        return None;
    }
    let tok = &text[pos..pos + len];
    Some(if tok.chars().next().is_some_and(|c| c.is_alphanumeric()) {
        format!("`{tok}`")
    } else {
        format!("`{}`", tok.escape_debug())
    })
}

/// End offset of the last token before `pos`, skipping whitespace and comments.
fn prev_token_end(text: &str, pos: usize) -> usize {
    let bytes = text.as_bytes();
    let mut i = pos.min(bytes.len());
    loop {
        while i > 0 && bytes[i - 1].is_ascii_whitespace() {
            i -= 1;
        }
        // a comment ends the line before us: back up to its start if this line has one
        let line_start = text[..i].rfind('\n').map(|n| n + 1).unwrap_or(0);
        match comment_start(&text[line_start..i]) {
            Some(c) if line_start + c < i => i = line_start + c,
            _ => return i,
        }
    }
}

/// Offset of a `#` comment in a line, ignoring `#` inside strings.
fn comment_start(line: &str) -> Option<usize> {
    let mut in_str = false;
    let mut esc = false;
    for (i, c) in line.char_indices() {
        if in_str {
            if esc {
                esc = false;
            } else if c == '\\' {
                esc = true;
            } else if c == '"' {
                in_str = false;
            }
        } else if c == '"' {
            in_str = true;
        } else if c == '#' {
            return Some(i);
        }
    }
    None
}

/// "declaration", "setting" or "action", from the first word of the statement ending at `end`.
fn statement_kind(text: &str, end: usize) -> &'static str {
    let start = after_last_delim(&text[..end], &[';', '{', '}']);
    let first = text[start..end]
        .lines()
        .map(|l| l.split('#').next().unwrap_or(""))
        .flat_map(str::split_whitespace)
        .next()
        .unwrap_or("");
    let before = text[..start].trim_end();
    match first {
        "require" | "include" | "list" | "table" | "secret" | "scanner" => "declaration",
        _ if before.ends_with('{') && is_settings_block(&text[..start]) => "setting",
        _ => "action",
    }
}

fn is_settings_block(before: &str) -> bool {
    let open = after_last_delim(before, &['{']).saturating_sub(1);
    let head_start = after_last_delim(&before[..open], &[';', '{', '}']);
    let head =
        before[head_start..open].lines().map(|l| l.split('#').next().unwrap_or("")).collect::<Vec<_>>().join(" ");
    let head = head.trim();
    head.starts_with("server")
        || head.starts_with("listener")
        || head.starts_with("table")
        || head.starts_with("scanner")
}

fn hint_for(text: &str, pos: usize, expected: &[&str]) -> Option<String> {
    let rest = &text[pos.min(text.len())..];
    let word: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
    if rest.starts_with('\'') {
        return Some("strings use double quotes: \"...\"".into());
    }
    if rest.starts_with("&&") || rest.starts_with("||") {
        return Some("write `and` / `or` to combine conditions".into());
    }
    if rest.starts_with('!') {
        return Some("write `not` to negate a condition".into());
    }
    let before = text[..pos.min(text.len())].trim_end();
    if (word == "else" && rest[4..].trim_start().starts_with("if")) || (word == "if" && before.ends_with("else")) {
        return Some("write `elsif` for an else-if branch".into());
    }
    if let Some(num) = word.strip_suffix("MB").or_else(|| word.strip_suffix("KB")).or_else(|| word.strip_suffix("GB")) {
        if num.chars().all(|c| c.is_ascii_digit()) && !num.is_empty() {
            return Some(format!("sizes are written `{num}K`, `{num}M` or `{num}G`"));
        }
    }
    if expected.contains(&"a condition") && word.is_empty() {
        return Some("a condition is a test such as `client.ip in trusted` or `authenticated`".into());
    }
    if expected.contains(&"a declaration or a stage block (`on connect { ... }`)") {
        return Some("at the top level a policy holds declarations (`list`, `table`, `server`, ...) and stage blocks such as `on rcpt { ... }`".into());
    }
    None
}
