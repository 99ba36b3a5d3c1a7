//! `ArgCursor`: walks an action's or a test's arguments.

use super::*;

/// Walks an action's or a test's arguments.
pub(super) struct ArgCursor<'a> {
    args: &'a [Arg],
    pos: usize,
    span: Span,
}

impl<'a> ArgCursor<'a> {
    pub(super) fn new(args: &'a [Arg], span: Span) -> ArgCursor<'a> {
        ArgCursor { args, pos: 0, span }
    }
    pub(super) fn next(&mut self) {
        self.pos += 1;
    }
    pub(super) fn peek(&self) -> Option<&'a Arg> {
        self.args.get(self.pos)
    }
    pub(super) fn peek_value(&self) -> Option<&'a Value> {
        match self.peek() {
            Some(Arg::Value(v)) => Some(v),
            _ => None,
        }
    }
    pub(super) fn peek_word(&self) -> Option<&'a str> {
        match self.peek_value().map(|v| &v.kind) {
            Some(ValueKind::Path(p)) => Some(p.as_str()),
            _ => None,
        }
    }
    pub(super) fn peek_tag(&self) -> Option<&'a ast::Ident> {
        match self.peek() {
            Some(Arg::Tag(t)) => Some(t),
            _ => None,
        }
    }
    pub(super) fn missing(&self, c: &mut Checker, what: &str) {
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
    pub(super) fn value(&mut self, c: &mut Checker, what: &str) -> Option<&'a Value> {
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
    pub(super) fn word(&mut self, c: &mut Checker, what: &str) -> Option<(String, Span)> {
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
    pub(super) fn keyword(&mut self, c: &mut Checker, kw: &str, example: &str) -> Option<()> {
        if self.peek_word() == Some(kw) {
            self.pos += 1;
            return Some(());
        }
        self.missing(c, &format!("`{kw}`, as in `{example}`"));
        None
    }
    pub(super) fn take_eq(&mut self) -> bool {
        if matches!(self.peek(), Some(Arg::Eq(_))) {
            self.pos += 1;
            true
        } else {
            false
        }
    }
    pub(super) fn plain_string(&mut self, c: &mut Checker, what: &str) -> Option<(String, Span)> {
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
    pub(super) fn duration(&mut self, c: &mut Checker, what: &str) -> Option<(u64, Span)> {
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
    pub(super) fn val(&mut self, c: &mut Checker, ctx: Ctx, what: &str) -> Option<(Val, Ty)> {
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
    pub(super) fn tag_value(&mut self, c: &mut Checker, tag: &str) -> Option<Option<&'a Value>> {
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
    pub(super) fn tag_strings(&mut self, c: &mut Checker, tag: &str) -> Option<Vec<StrId>> {
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
    pub(super) fn tag_duration(&mut self, c: &mut Checker, tag: &str) -> Option<Option<u64>> {
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
    pub(super) fn finish(&self, c: &mut Checker, name: &str) -> Option<()> {
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
