//! `mailc fmt`: one canonical layout for a policy.
//!
//! The formatter changes only the white space between tokens; it never adds, removes,
//! joins or splits a token, and checks that it did not (the tokens of its output are
//! compared with those of its input). So it formats a file with syntax errors too: the
//! layout follows the file's brackets. The layout (spec/cli.md, `mailc fmt`):
//!
//! - two spaces of indentation per block; one declaration or statement per line;
//! - stage, rules, `server`, `listener` and option blocks are always broken over lines;
//!   an `if` (with its `elsif` and `else`) stays on one line when each of its blocks holds
//!   one simple statement, nothing holds a comment, and the line fits in [`WIDTH`]
//!   columns; otherwise each block is broken, with `} elsif ... {` and `} else {`;
//! - a `[...]` list stays on one line when it fits, else one item per line;
//! - one space between tokens, none before `;`, `,`, `)` and `]`, none after `(` and `[`,
//!   none between `allof`/`anyof` and `(`; `{}` for an empty block;
//! - comments stay where they are: a comment that ends a line of code still ends it, a
//!   comment on its own line stays on its own line, indented with the code around it;
//! - blank lines between declarations and statements are kept, at most one in a row; none
//!   at the start or the end of a block or the file; lines end without spaces; the file
//!   ends with one line end.

use crate::syntax::{self, Kind, Token, Tree};

/// Lines are kept within this many columns where a list or an `if` can be broken.
pub const WIDTH: usize = 100;

const INDENT: &str = "  ";

/// The formatted text, or why it could not be formatted safely.
pub fn format(text: &str) -> Result<String, String> {
    let toks = syntax::lex(text);
    let trees = syntax::tree(text, &toks, false);
    let mut p =
        Printer { text, toks: &toks, lines: Vec::new(), cur: String::new(), cur_indent: 0, prev: None, force: None };
    p.block_body(&trees, 0, true);
    p.flush();
    while p.lines.last().is_some_and(|l| l.is_empty()) {
        p.lines.pop();
    }
    let mut out = p.lines.join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    // The safety net: the same tokens, in the same order.
    let after = syntax::lex(&out);
    let same = after.len() == toks.len()
        && after.iter().zip(&toks).all(|(a, b)| a.kind == b.kind && a.text(&out).trim_end() == b.text(text).trim_end());
    if !same {
        return Err("the formatter would change the policy's tokens (a bug in mailc fmt); the file is left as it is"
            .to_string());
    }
    Ok(out)
}

struct Printer<'a> {
    text: &'a str,
    toks: &'a [Token],
    lines: Vec<String>,
    cur: String,
    /// Indentation (in levels) of the current line.
    cur_indent: usize,
    /// The last token written on the current line.
    prev: Option<usize>,
    /// A line break must come before the next token, at this indentation (after a comment
    /// that ends a line, or a string left open).
    force: Option<usize>,
}

impl<'a> Printer<'a> {
    fn t(&self, i: usize) -> &'a str {
        self.toks[i].text(self.text)
    }

    fn is_comment(&self, k: &Tree) -> bool {
        matches!(k, Tree::Tok(i) if self.toks[*i].kind == Kind::Comment)
    }

    fn flush(&mut self) {
        if !self.cur.is_empty() {
            let line = std::mem::take(&mut self.cur);
            self.lines.push(line.trim_end().to_string());
        }
        self.prev = None;
    }

    fn newline(&mut self, indent: usize) {
        self.flush();
        self.cur_indent = indent;
        self.force = None;
    }

    fn blank_line(&mut self) {
        self.flush();
        if self.lines.last().is_some_and(|l| !l.is_empty()) {
            self.lines.push(String::new());
        }
    }

    fn needs_space(&self, p: usize, n: usize) -> bool {
        let (pt, nt) = (self.t(p), self.t(n));
        let (pk, nk) = (self.toks[p].kind, self.toks[n].kind);
        if pk == Kind::Other || nk == Kind::Other {
            return self.toks[n].start > self.toks[p].end;
        }
        if nk == Kind::Punct && matches!(nt, ";" | "," | ")" | "]") {
            return false;
        }
        if pk == Kind::Punct && matches!(pt, "(" | "[") {
            return false;
        }
        if pk == Kind::Punct && pt == "{" && nt == "}" {
            return false;
        }
        !(pk == Kind::Word && matches!(pt, "allof" | "anyof") && nt == "(")
    }

    /// Write token `i` on the current line (after a forced break if one is pending).
    fn tok(&mut self, i: usize) {
        let tk = self.toks[i];
        if tk.kind == Kind::Comment {
            let own_line = i == 0 || tk.newlines_before > 0 || self.prev.is_none();
            if own_line {
                let cont = if self.cur.is_empty() { 0 } else { 2 };
                let indent = self.force.unwrap_or(self.cur_indent + cont);
                if !self.cur.is_empty() {
                    self.newline(indent);
                }
                self.cur_indent = indent;
                self.cur = INDENT.repeat(indent);
                self.cur.push_str(self.t(i).trim_end());
                self.flush();
                self.force = Some(indent);
                return;
            }
            self.cur.push(' ');
            self.cur.push_str(self.t(i).trim_end());
            self.prev = Some(i);
            self.force = Some(self.cur_indent + 2);
            return;
        }
        if let Some(indent) = self.force.take() {
            self.newline(indent);
        }
        if self.cur.is_empty() {
            self.cur = INDENT.repeat(self.cur_indent);
        } else if let Some(p) = self.prev {
            if self.needs_space(p, i) {
                self.cur.push(' ');
            }
        }
        self.cur.push_str(self.t(i));
        self.prev = Some(i);
        if tk.kind == Kind::Str(false) {
            self.force = Some(self.cur_indent + 2);
        }
    }

    /// The statements of a block (or of the file), each on its own lines at `indent`.
    fn block_body(&mut self, kids: &[Tree], indent: usize, top: bool) {
        let stmts = syntax::statements(self.text, self.toks, kids, top);
        let mut at = 0;
        let mut first = true;
        for (a, b) in stmts.iter().copied().chain([(kids.len(), kids.len())]) {
            // Comments between statements, each on its own line.
            for k in &kids[at..a] {
                if let Tree::Tok(i) = k {
                    let own = self.toks[*i].newlines_before > 0 || *i == 0;
                    if own {
                        if !first && self.toks[*i].newlines_before > 1 {
                            self.blank_line();
                        }
                        self.newline(indent);
                    }
                    self.tok(*i);
                    first = false;
                }
            }
            if a == b {
                break;
            }
            let lead = kids[a].first();
            if !first && self.toks[lead].newlines_before > 1 {
                self.blank_line();
            }
            self.newline(indent);
            self.statement(&kids[a..b], indent);
            first = false;
            at = b;
        }
        self.newline(indent);
    }

    fn statement(&mut self, kids: &[Tree], indent: usize) {
        let head = kids.first().map(Tree::first).map(|i| self.t(i)).unwrap_or("");
        if head == "if" && self.fits_inline(kids, indent) {
            self.seq(kids, indent, Blocks::Inline);
            return;
        }
        self.seq(kids, indent, Blocks::Broken);
    }

    /// Whether an `if` statement can stay on one line.
    fn fits_inline(&self, kids: &[Tree], indent: usize) -> bool {
        let simple = kids.iter().all(|k| match k {
            Tree::Group { open, kids: inner, close } if self.t(*open) == "{" => {
                close.is_some()
                    && syntax::statements(self.text, self.toks, inner, false).len() <= 1
                    && !inner.iter().any(|k| matches!(k, Tree::Group { open, .. } if self.t(*open) == "{"))
            }
            _ => true,
        });
        simple && self.inline_len(kids).is_some_and(|n| indent * INDENT.len() + n <= WIDTH)
    }

    /// Length of `kids` written on one line, or None when they cannot be (a comment, a
    /// string that spans or ends a line).
    fn inline_len(&self, kids: &[Tree]) -> Option<usize> {
        let mut idx = Vec::new();
        fn walk(k: &Tree, out: &mut Vec<usize>) {
            match k {
                Tree::Tok(i) => out.push(*i),
                Tree::Group { open, close, kids } => {
                    out.push(*open);
                    for k in kids {
                        walk(k, out);
                    }
                    if let Some(c) = close {
                        out.push(*c);
                    }
                }
            }
        }
        for k in kids {
            walk(k, &mut idx);
        }
        let mut n = 0;
        for (j, &i) in idx.iter().enumerate() {
            let t = self.toks[i];
            if matches!(t.kind, Kind::Comment | Kind::Str(false)) || self.t(i).contains('\n') {
                return None;
            }
            if j > 0 && self.needs_space(idx[j - 1], i) {
                n += 1;
            }
            n += self.t(i).chars().count();
        }
        Some(n)
    }

    fn seq(&mut self, kids: &[Tree], indent: usize, blocks: Blocks) {
        for k in kids {
            match k {
                Tree::Tok(i) => self.tok(*i),
                Tree::Group { open, close, kids: inner } => match self.t(*open) {
                    "{" => self.brace(*open, *close, inner, indent, blocks),
                    "[" => self.list(*open, *close, inner, indent),
                    _ => {
                        self.tok(*open);
                        self.seq(inner, indent, blocks);
                        if let Some(c) = close {
                            self.tok(*c);
                        }
                    }
                },
            }
        }
    }

    fn brace(&mut self, open: usize, close: Option<usize>, inner: &[Tree], indent: usize, blocks: Blocks) {
        self.tok(open);
        let line_indent = self.cur_indent;
        let only_comments = inner.iter().all(|k| self.is_comment(k));
        if inner.is_empty() {
            if let Some(c) = close {
                self.tok(c);
            }
            return;
        }
        if blocks == Blocks::Inline && !only_comments {
            self.seq(inner, indent, Blocks::Inline);
            if let Some(c) = close {
                self.tok(c);
            }
            return;
        }
        // A comment right after `{` stays on its line.
        let mut rest = inner;
        if let Some(Tree::Tok(i)) = inner.first() {
            if self.toks[*i].kind == Kind::Comment && self.toks[*i].newlines_before == 0 {
                self.tok(*i);
                rest = &inner[1..];
            }
        }
        self.block_body(rest, line_indent + 1, false);
        self.newline(line_indent);
        if let Some(c) = close {
            self.tok(c);
        }
        let _ = indent;
    }

    fn list(&mut self, open: usize, close: Option<usize>, inner: &[Tree], indent: usize) {
        let start = self.cur.chars().count();
        let all: Vec<Tree> =
            std::iter::once(Tree::Tok(open)).chain(inner.iter().cloned()).chain(close.map(Tree::Tok)).collect();
        if close.is_some() && self.inline_len(&all).is_some_and(|n| start + 1 + n <= WIDTH) {
            self.tok(open);
            self.seq(inner, indent, Blocks::Broken);
            if let Some(c) = close {
                self.tok(c);
            }
            return;
        }
        self.tok(open);
        let line_indent = self.cur_indent;
        // One item (up to and with its `,`) per line.
        let mut item_start = true;
        for k in inner {
            if self.is_comment(k) {
                self.seq(std::slice::from_ref(k), indent, Blocks::Broken);
                continue;
            }
            if item_start {
                if let Tree::Tok(i) = k {
                    if self.toks[*i].newlines_before > 1 && self.prev.is_some() {
                        self.blank_line();
                    }
                }
                self.newline(line_indent + 1);
                item_start = false;
            }
            self.seq(std::slice::from_ref(k), indent, Blocks::Broken);
            if matches!(k, Tree::Tok(i) if self.t(*i) == ",") {
                item_start = true;
            }
        }
        if let Some(c) = close {
            self.newline(line_indent);
            self.tok(c);
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Blocks {
    Inline,
    Broken,
}

#[cfg(test)]
mod tests {
    use super::format;

    fn fmt(s: &str) -> String {
        let out = format(s).expect("format");
        assert_eq!(format(&out).expect("format again"), out, "not idempotent for {s:?}");
        out
    }

    #[test]
    fn canonical_layout() {
        let messy =
            "list  a=[ \"x\" ,\"y\" ] ;\non rcpt{if recipient.domain  in a{reject 550 5.7.1 \"no\" ;}\n\n\n  accept ;}";
        assert_eq!(
            fmt(messy),
            "list a = [\"x\", \"y\"];\non rcpt {\n  if recipient.domain in a { reject 550 5.7.1 \"no\"; }\n\n  accept;\n}\n"
        );
        // The same policy laid out otherwise formats the same.
        let other = "list a = [\n  \"x\",\n  \"y\"\n];\non rcpt {\n  if recipient.domain in a {\n    reject 550 5.7.1 \"no\";\n  }\n\n  accept;\n}\n";
        assert_eq!(fmt(other), fmt(messy));
    }

    #[test]
    fn comments_are_kept() {
        let s = "# head\non rcpt { # why\n  if anyof(a,   # first\n b) { reject; } # trailing\n  # own line\n}\n";
        let out = fmt(s);
        assert!(out.contains("# head\non rcpt { # why\n"), "{out}");
        assert!(out.contains("if anyof(a, # first\n"), "{out}");
        assert!(out.contains("  # own line\n}"), "{out}");
        assert!(out.contains("} # trailing\n"), "{out}");
    }

    #[test]
    fn if_else_breaks_together() {
        let s = "on mail { if a { set x; set y; } else { stop; } }";
        assert_eq!(fmt(s), "on mail {\n  if a {\n    set x;\n    set y;\n  } else {\n    stop;\n  }\n}\n");
        let s = "on mail { if a { stop; } elsif b { accept; } else { reject; } }";
        assert_eq!(fmt(s), "on mail {\n  if a { stop; } elsif b { accept; } else { reject; }\n}\n");
    }

    #[test]
    fn long_lists_break() {
        let items: Vec<String> = (0..20).map(|i| format!("\"host{i}.example.com\"")).collect();
        let s = format!("list l = domains [{}];\n", items.join(", "));
        let out = fmt(&s);
        assert!(out.starts_with("list l = domains [\n  \"host0.example.com\",\n"), "{out}");
        assert!(out.ends_with("\n  \"host19.example.com\"\n];\n"), "{out}");
    }

    #[test]
    fn broken_files_keep_their_tokens() {
        for s in
            ["on rcpt { reject \"open;\n accept; }", "on rcpt {\n if a && b { x; }\n", "} ) ] { ( [", "a\u{e9}b 'x' !y"]
        {
            let out = fmt(s);
            let toks = |t: &str| crate::syntax::lex(t).iter().map(|k| k.text(t).to_string()).collect::<Vec<_>>();
            assert_eq!(toks(&out), toks(s));
        }
    }

    /// Every prefix of a policy that uses everything formats without losing a token, and
    /// formatting its result again changes nothing.
    #[test]
    fn every_prefix_formats_stably() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/check/clean_everything.mailpolicy");
        let all = std::fs::read_to_string(path).expect("read");
        for i in (0..all.len()).step_by(3) {
            if let Some(p) = all.get(..i) {
                let once = format(p).unwrap_or_else(|e| panic!("{e} at {i}"));
                assert_eq!(format(&once).as_deref(), Ok(once.as_str()), "not idempotent at {i}");
            }
        }
    }
}
