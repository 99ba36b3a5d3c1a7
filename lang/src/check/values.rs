//! Values conditions and actions take: templates, patterns and sets.

use super::*;

impl<'s> Checker<'s> {
    pub(super) fn templates(&mut self, v: &Value, ctx: Ctx) -> Vec<Template> {
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

    pub(super) fn patterns(&mut self, v: &Value, glob: bool) -> Vec<PatId> {
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

    pub(super) fn set_ref(&mut self, v: &Value, ty: Ty, lhs_name: &str) -> Option<SetRef> {
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
    pub(super) fn template(&mut self, s: &ast::StrLit, ctx: Ctx) -> Option<Template> {
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

    pub(super) fn string_arg(&mut self, v: &Value, ctx: Ctx, what: &str) -> Option<Template> {
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
}
