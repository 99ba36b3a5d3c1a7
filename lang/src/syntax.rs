//! The policy as tokens and bracket groups: what error recovery, the formatter and the
//! editor support need to see in a file that may not parse.
//!
//! The lexer agrees with `grammar.pest` on where strings and comments start and end (a
//! string ends at its closing quote, a backslash takes the next character, a string that
//! meets the end of its line is unterminated), so brackets inside strings and comments are
//! never counted. Every byte of the file belongs to a token or to white space.

/// What a token is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A name, a path, a number, a size, a duration or an enhanced code: `[A-Za-z0-9_]`
    /// followed by `[A-Za-z0-9_.]*`.
    Word,
    /// A string literal; `false` when it meets the end of its line or file unclosed.
    Str(bool),
    /// `#` to the end of the line.
    Comment,
    /// `:name`.
    Tag,
    /// `; = , { } ( ) [ ]` and `== != <= >= < >`.
    Punct,
    /// Anything else, one character at a time.
    Other,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Token {
    pub kind: Kind,
    pub start: u32,
    pub end: u32,
    /// Line ends between the previous token (or the start of the file) and this one.
    pub newlines_before: u32,
}

impl Token {
    pub fn text<'t>(&self, text: &'t str) -> &'t str {
        text.get(self.start as usize..self.end as usize).unwrap_or("")
    }
    pub fn is(&self, text: &str, s: &str) -> bool {
        matches!(self.kind, Kind::Punct | Kind::Word | Kind::Other) && self.text(text) == s
    }
}

fn word_start(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

fn word_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '.'
}

/// Split `text` into tokens.
pub fn lex(text: &str) -> Vec<Token> {
    let mut out = Vec::new();
    let mut it = text.char_indices().peekable();
    let mut newlines = 0u32;
    while let Some((i, c)) = it.next() {
        if c == '\n' {
            newlines += 1;
            continue;
        }
        if c == ' ' || c == '\t' || c == '\r' {
            continue;
        }
        let mut end = i + c.len_utf8();
        let kind = match c {
            '"' => {
                let mut closed = false;
                let mut esc = false;
                while let Some(&(j, d)) = it.peek() {
                    if esc {
                        esc = false;
                    } else if d == '\\' {
                        esc = true;
                    } else if d == '"' {
                        it.next();
                        end = j + 1;
                        closed = true;
                        break;
                    } else if d == '\n' {
                        break;
                    }
                    it.next();
                    end = j + d.len_utf8();
                }
                Kind::Str(closed)
            }
            '#' => {
                while let Some(&(j, d)) = it.peek() {
                    if d == '\n' {
                        break;
                    }
                    it.next();
                    end = j + d.len_utf8();
                }
                Kind::Comment
            }
            ':' if it.peek().is_some_and(|&(_, d)| d.is_ascii_alphabetic() || d == '_') => {
                while let Some(&(j, d)) = it.peek() {
                    if !(d.is_ascii_alphanumeric() || d == '_') {
                        break;
                    }
                    it.next();
                    end = j + 1;
                }
                Kind::Tag
            }
            c if word_start(c) => {
                while let Some(&(j, d)) = it.peek() {
                    if !word_char(d) {
                        break;
                    }
                    it.next();
                    end = j + 1;
                }
                Kind::Word
            }
            // Not a string of the language (a syntax error), but one token, so that the
            // formatter leaves what is inside alone.
            '\'' => {
                while let Some(&(j, d)) = it.peek() {
                    if d == '\n' {
                        break;
                    }
                    it.next();
                    end = j + d.len_utf8();
                    if d == '\'' {
                        break;
                    }
                }
                Kind::Other
            }
            ';' | ',' | '{' | '}' | '(' | ')' | '[' | ']' => Kind::Punct,
            '=' | '!' | '<' | '>' => {
                if it.peek().is_some_and(|&(_, d)| d == '=') {
                    it.next();
                    end += 1;
                    Kind::Punct
                } else if c == '!' {
                    Kind::Other
                } else {
                    Kind::Punct
                }
            }
            _ => Kind::Other,
        };
        out.push(Token { kind, start: i as u32, end: end as u32, newlines_before: newlines });
        newlines = 0;
    }
    out
}

/// A token, or a bracket group with what it holds. Comments are kept as tokens.
#[derive(Clone, Debug)]
pub enum Tree {
    Tok(usize),
    /// `open` and `close` are token indices; `close` is None when the group is never closed.
    Group {
        open: usize,
        close: Option<usize>,
        kids: Vec<Tree>,
    },
}

impl Tree {
    /// Index of the first token.
    pub fn first(&self) -> usize {
        match self {
            Tree::Tok(i) => *i,
            Tree::Group { open, .. } => *open,
        }
    }
    /// Index of the last token.
    pub fn last(&self) -> usize {
        match self {
            Tree::Tok(i) => *i,
            Tree::Group { open, close, kids } => close.or_else(|| kids.last().map(Tree::last)).unwrap_or(*open),
        }
    }
}

fn closer(open: &str) -> &'static str {
    match open {
        "{" => "}",
        "(" => ")",
        _ => "]",
    }
}

/// Group the tokens by brackets. A `}` closes the innermost `{` (and any `(` or `[` left
/// open inside it); a `)` or `]` that matches nothing in its `{ }` is a plain token.
/// When `column_one_breaks` is set, a top-level keyword that starts a line at its first
/// column closes every open group: it is taken as the start of the next declaration, so a
/// block that lacks its `}` does not swallow the rest of the file.
pub fn tree(text: &str, toks: &[Token], column_one_breaks: bool) -> Vec<Tree> {
    // Stack of (open index, kids).
    let mut stack: Vec<(usize, Vec<Tree>)> = Vec::new();
    let mut top: Vec<Tree> = Vec::new();
    fn push(stack: &mut [(usize, Vec<Tree>)], top: &mut Vec<Tree>, t: Tree) {
        match stack.last_mut() {
            Some((_, kids)) => kids.push(t),
            None => top.push(t),
        }
    }
    fn close_one(stack: &mut Vec<(usize, Vec<Tree>)>, top: &mut Vec<Tree>, close: Option<usize>) {
        if let Some((open, kids)) = stack.pop() {
            push(stack, top, Tree::Group { open, close, kids });
        }
    }
    for (i, t) in toks.iter().enumerate() {
        let s = t.text(text);
        if column_one_breaks
            && !stack.is_empty()
            && t.kind == Kind::Word
            && starts_line_at_column_one(text, t)
            && TOP_KEYWORDS.contains(&s)
        {
            while !stack.is_empty() {
                close_one(&mut stack, &mut top, None);
            }
        }
        match (t.kind, s) {
            (Kind::Punct, "{" | "(" | "[") => stack.push((i, Vec::new())),
            (Kind::Punct, "}") => {
                if stack.iter().any(|(o, _)| toks[*o].text(text) == "{") {
                    while stack.last().is_some_and(|(o, _)| toks[*o].text(text) != "{") {
                        close_one(&mut stack, &mut top, None);
                    }
                    close_one(&mut stack, &mut top, Some(i));
                } else {
                    push(&mut stack, &mut top, Tree::Tok(i));
                }
            }
            (Kind::Punct, ")" | "]") => {
                let depth = stack
                    .iter()
                    .rev()
                    .take_while(|(o, _)| toks[*o].text(text) != "{")
                    .position(|(o, _)| closer(toks[*o].text(text)) == s);
                match depth {
                    Some(d) => {
                        for _ in 0..d {
                            close_one(&mut stack, &mut top, None);
                        }
                        close_one(&mut stack, &mut top, Some(i));
                    }
                    None => push(&mut stack, &mut top, Tree::Tok(i)),
                }
            }
            _ => push(&mut stack, &mut top, Tree::Tok(i)),
        }
    }
    while !stack.is_empty() {
        close_one(&mut stack, &mut top, None);
    }
    top
}

/// Words that begin a declaration or a stage block at the top level.
pub const TOP_KEYWORDS: &[&str] = &[
    "require",
    "include",
    "list",
    "table",
    "secret",
    "scanner",
    "mailing_list",
    "server",
    "listener",
    "rules",
    "on",
    "route",
];

fn starts_line_at_column_one(text: &str, t: &Token) -> bool {
    let s = t.start as usize;
    s == 0 || text.as_bytes().get(s - 1) == Some(&b'\n')
}

/// Whether token `t` is the first token of its line.
pub fn starts_line(toks: &[Token], i: usize) -> bool {
    i == 0 || toks[i].newlines_before > 0
}

/// Split a sequence of trees into statements (inside a block) or items (at the top level):
/// a statement ends with `;`, with a `{ }` group that is not followed by `elsif` or `else`
/// (at the top level, a group followed by `;` takes the `;` too), or with a string left
/// unterminated at the end of its line. Comments between statements belong to none.
/// Returns index ranges into `kids` (inclusive start, exclusive end).
pub fn statements(text: &str, toks: &[Token], kids: &[Tree], top_level: bool) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut start: Option<usize> = None;
    let next_code = |from: usize| {
        kids[from..].iter().position(|k| !matches!(k, Tree::Tok(i) if toks[*i].kind == Kind::Comment)).map(|p| p + from)
    };
    let mut i = 0;
    while i < kids.len() {
        let k = &kids[i];
        if start.is_none() {
            if matches!(k, Tree::Tok(t) if toks[*t].kind == Kind::Comment) {
                i += 1;
                continue;
            }
            start = Some(i);
        }
        let ends = match k {
            Tree::Tok(t) => {
                let tok = &toks[*t];
                tok.is(text, ";") || tok.kind == Kind::Str(false)
            }
            Tree::Group { open, .. } if toks[*open].text(text) == "{" => {
                match next_code(i + 1).map(|n| (n, &kids[n])) {
                    Some((_, Tree::Tok(n))) if !top_level && matches!(toks[*n].text(text), "elsif" | "else") => false,
                    Some((n, Tree::Tok(t))) if top_level && toks[*t].is(text, ";") => {
                        i = n;
                        true
                    }
                    _ => true,
                }
            }
            _ => false,
        };
        if ends {
            out.push((start.take().unwrap_or(i), i + 1));
        }
        i += 1;
    }
    if let Some(s) = start {
        // Trailing comments are not part of the last statement.
        let mut end = kids.len();
        while end > s && matches!(&kids[end - 1], Tree::Tok(t) if toks[*t].kind == Kind::Comment) {
            end -= 1;
        }
        out.push((s, end));
    }
    out
}

/// Byte range covered by trees `kids[a..b]`.
pub fn range(toks: &[Token], kids: &[Tree]) -> Option<(usize, usize)> {
    let first = kids.first()?.first();
    let last = kids.last()?.last();
    Some((toks[first].start as usize, toks[last].end as usize))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_and_comments_hide_brackets() {
        let text = "on rcpt { reject \"}\"; # }\n}\n";
        let toks = lex(text);
        let t = tree(text, &toks, false);
        assert_eq!(t.len(), 3, "{t:?}");
        assert!(matches!(&t[2], Tree::Group { close: Some(_), .. }));
    }

    #[test]
    fn unterminated_string_ends_at_line_end() {
        let text = "reject \"abc;\naccept;";
        let toks = lex(text);
        assert_eq!(toks[1].kind, Kind::Str(false));
        assert_eq!(toks[1].text(text), "\"abc;");
        let t = tree(text, &toks, false);
        assert_eq!(statements(text, &toks, &t, false), vec![(0, 2), (2, 4)]);
    }

    #[test]
    fn operators() {
        let text = "a<=b == c != d < e :is f!g";
        let kinds: Vec<&str> = lex(text).iter().map(|t| t.text(text)).collect();
        assert_eq!(kinds, ["a", "<=", "b", "==", "c", "!=", "d", "<", "e", ":is", "f", "!", "g"]);
    }

    #[test]
    fn column_one_keyword_closes_blocks() {
        let text = "on connect {\n  accept;\n\non rcpt {\n  reject;\n}\n";
        let toks = lex(text);
        let t = tree(text, &toks, true);
        let items = statements(text, &toks, &t, true);
        assert_eq!(items.len(), 2, "{t:?}");
    }
}
