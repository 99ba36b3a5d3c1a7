//! pest's errors in plain words: what was expected (named tokens, "expected `;`"), what
//! was found, and a hint for the common slips (an unclosed string, a missing `;`, a
//! setting outside its block).

use super::*;

pub(super) fn is_punct(r: Rule) -> bool {
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
pub(super) fn describe(rule: Rule) -> Option<&'static str> {
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
        | Rule::settings_kw
        | Rule::item_only => "a declaration or a stage block (`on connect { ... }`)",
        Rule::EOI => "the end of the file",
        Rule::stmt_only => "a statement",
        Rule::option_only => "a setting",
        _ => return None,
    })
}

pub(super) fn error_parts(e: &pest::error::Error<Rule>) -> (usize, Vec<Rule>) {
    let pos = match e.location {
        pest::error::InputLocation::Pos(p) => p,
        pest::error::InputLocation::Span((s, _)) => s,
    };
    let positives = match &e.variant {
        pest::error::ErrorVariant::ParsingError { positives, .. } => positives.clone(),
        _ => Vec::new(),
    };
    (pos, positives)
}

pub(super) fn syntax_error(file: FileId, text: &str, e: pest::error::Error<Rule>) -> Diagnostic {
    let (pos, positives) = error_parts(&e);
    syntax_error_at(file, text, pos, &positives, false)
}

/// The diagnostic for a parse that failed at byte `pos` of `text` expecting `positives`.
/// `piece`: the parse was of one declaration or statement, whose end is not the file's.
pub(super) fn syntax_error_at(file: FileId, text: &str, pos: usize, positives: &[Rule], piece: bool) -> Diagnostic {
    let pos = pos.min(text.len());
    let mut expected: Vec<&'static str> = Vec::new();
    for r in positives {
        if piece && *r == Rule::EOI {
            continue;
        }
        if let Some(d) = describe(*r) {
            if !expected.contains(&d) {
                expected.push(d);
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
pub(super) fn string_closes(rest: &str) -> bool {
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
pub(super) fn after_last_delim(text: &str, delims: &[char]) -> usize {
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

pub(super) fn join_alternatives(items: &[&str]) -> String {
    match items.len() {
        0 => String::new(),
        1 => items[0].to_string(),
        n => format!("{} or {}", items[..n - 1].join(", "), items[n - 1]),
    }
}

pub(super) fn token_len(text: &str, pos: usize) -> usize {
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

pub(super) fn found_token(text: &str, pos: usize) -> Option<String> {
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
pub(super) fn prev_token_end(text: &str, pos: usize) -> usize {
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
pub(super) fn comment_start(line: &str) -> Option<usize> {
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
pub(super) fn statement_kind(text: &str, end: usize) -> &'static str {
    let start = after_last_delim(&text[..end], &[';', '{', '}']);
    let first = text[start..end]
        .lines()
        .map(|l| l.split('#').next().unwrap_or(""))
        .flat_map(str::split_whitespace)
        .next()
        .unwrap_or("");
    match first {
        "require" | "include" | "list" | "table" | "secret" | "scanner" => "declaration",
        _ if is_settings_block(&text[..start]) => "setting",
        _ => "action",
    }
}

pub(super) fn is_settings_block(before: &str) -> bool {
    // The innermost `{` still open at the end of `before`.
    let toks = syntax::lex(before);
    let mut stack = Vec::new();
    for t in &toks {
        match t.text(before) {
            "{" if t.kind == Kind::Punct => stack.push(t.start as usize),
            "}" if t.kind == Kind::Punct => {
                stack.pop();
            }
            _ => {}
        }
    }
    let Some(&open) = stack.last() else { return false };
    let head_start = after_last_delim(&before[..open], &[';', '{', '}']);
    let head =
        before[head_start..open].lines().map(|l| l.split('#').next().unwrap_or("")).collect::<Vec<_>>().join(" ");
    let head = head.trim();
    head.starts_with("server")
        || head.starts_with("listener")
        || head.starts_with("table")
        || head.starts_with("scanner")
}

pub(super) fn hint_for(text: &str, pos: usize, expected: &[&str]) -> Option<String> {
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
