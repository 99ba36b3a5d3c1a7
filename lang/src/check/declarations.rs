//! Declarations: `require`, lists, tables, secrets, scanners, and the names they define;
//! undefined and unused names.

use super::*;

impl<'s> Checker<'s> {
    pub(super) fn declare(&mut self, item: &Item) {
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
    pub(super) fn cidr(&mut self, s: &str, span: Span) -> Option<Cidr> {
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

    pub(super) fn list(&mut self, name: &ast::Ident, kind: ast::ListKind, items: &[Value]) {
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

    pub(super) fn resource(
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
                    if kind.name == "milter" { schema::SCANNER_MILTER.to_vec() } else { schema::SCANNER.to_vec() },
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
        if matches!(kw, ast::ResourceKw::Scanner) && kind.name == "milter" {
            // A milter is consulted at every stage: declaring it is using it.
            if let Some(s) = self.syms.get_mut(&name.name) {
                s.used = true;
            }
            if let Some(src) = source {
                let v = unescape_plain(&src.raw);
                if let Err(e) = milter_address(&v) {
                    self.err(
                        Diagnostic::error("mailc::arguments", format!("`{v}` is not a milter address: {e}"))
                            .at(src.span)
                            .help("write \"inet:127.0.0.1:8891\", \"inet:[::1]:8891\" or \"unix:/run/milter.sock\""),
                    );
                }
            }
        }
        if kind.name == "sql" {
            if let Some((_, OptValue::Str(url))) = opts.iter().find(|(n, _)| n == "url") {
                if let Err(e) = crate::resources::pg_url(url) {
                    let at = options.iter().find(|o| o.name.name == "url").map(|o| o.value.span).unwrap_or(name.span);
                    self.err(
                        Diagnostic::error("mailc::setting", format!("the `url` of the sql table `{}`: {e}", name.name))
                            .at(at)
                            .help(format!(
                                "libpq's sslmode is one of {}: \"postgresql://mail@db/mail?sslmode=verify-full\"",
                                crate::resources::SSLMODES.join(", ")
                            )),
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
            options: lower_options(kw, &kind.name, &opts),
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
    /// and change (a `list` file, `sql` with `members`, `insert` and `delete`, or `ldap`
    /// with the group entry's `attribute`), an http(s) `web` URL.
    pub(super) fn mailing_list(
        &mut self,
        name: &ast::Ident,
        source: Option<&ast::StrLit>,
        options: &[ast::Opt],
        items: &[(FileId, Item)],
    ) {
        let opts = match self.prog.mailing_lists.iter().find(|l| l.name == name.name).map(|l| &l.options) {
            Some(Options::MailingList(o)) => o.clone(),
            _ => MailingListOptions::default(),
        };
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
            if !options.iter().any(|o| o.name.name == r) {
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
        if self.prog.server.dkim_key.is_none() {
            self.err(
                Diagnostic::warning("mailc::setting", format!("the mailing list `{}` is not DKIM-signed", name.name))
                    .at(name.span)
                    .help("RFC 8058 one-click unsubscribe needs a DKIM signature that covers List-Unsubscribe: set the server's `dkim_key` and `dkim_selector`"),
            );
        }
        let at = |n: &str| options.iter().find(|o| o.name.name == n).map(|o| o.value.span).unwrap_or(name.span);
        if let Some(t) = options.iter().find(|o| o.name.name == "subscribers").and_then(|o| match &o.value.kind {
            ValueKind::Path(p) => Some(p.clone()),
            _ => None,
        }) {
            let kind = self.syms.get(&t).filter(|s| s.kind == SymKind::Table).map(|s| s.detail.clone());
            let table_opts: Vec<String> = items
                .iter()
                .find_map(|(_, it)| match it {
                    Item::Resource { kw: ast::ResourceKw::Table, name: n, options: o, .. } if n.name == t => {
                        Some(o.iter().map(|x| x.name.name.clone()).collect())
                    }
                    _ => None,
                })
                .unwrap_or_default();
            match kind.as_deref() {
                Some("list") | None => {}
                Some("ldap") => {
                    if !table_opts.iter().any(|n| n == "attribute") {
                        self.err(
                            Diagnostic::error(
                                "mailc::setting",
                                format!("the ldap table `{t}` holds the subscribers of `{}` but has no `attribute`", name.name),
                            )
                            .at(at("subscribers"))
                            .help("the table's `base` is the list's group entry and `attribute` its multi-valued attribute with one subscriber each: `base \"cn=news,ou=lists,dc=example,dc=com\"; attribute \"rfc822MailMember\";`"),
                        );
                    }
                    if !table_opts.iter().any(|n| n == "bind_dn") {
                        self.err(
                            Diagnostic::warning(
                                "mailc::setting",
                                format!("the ldap table `{t}` binds anonymously, but `{}` writes its subscribers there", name.name),
                            )
                            .at(at("subscribers"))
                            .help("directories seldom let an anonymous client write: add `bind_dn` and `password` for an account that may modify the group entry"),
                        );
                    }
                }
                Some("sql") => {
                    let sql = &table_opts;
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
                        format!("`{t}` is a `{other}` table; a mailing list's subscribers are a `list` file, an `sql` table or an `ldap` group entry"),
                    )
                    .at(at("subscribers"))
                    .help("the daemon lists, adds and removes subscribers: `table subscribers = list \"news.subscribers\";`"),
                ),
            }
        }
        // Only a string `web` (another value is already a type error).
        let web_is_str = options.iter().any(|o| o.name.name == "web" && matches!(o.value.kind, ValueKind::Str(_)));
        if let Some(w) = web_is_str.then_some(&opts.web) {
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
        if let Some(ValueKind::Num(n)) = options.iter().find(|o| o.name.name == "bounce_limit").map(|o| &o.value.kind) {
            if *n < 1.0 || n.fract() != 0.0 {
                self.err(
                    Diagnostic::error("mailc::setting", "`bounce_limit` is a whole number of at least 1")
                        .at(at("bounce_limit")),
                );
            }
        }
    }

    pub(super) fn undefined(&mut self, name: &str, span: Span, want: Option<&str>) {
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

    pub(super) fn use_sym(&mut self, name: &str, span: Span, want: &[&str]) -> Option<(SymKind, u32, String)> {
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

    pub(super) fn need_cap(&mut self, cap: &str, span: Span, what: &str) {
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
    pub(super) fn in_std(&self, span: Span) -> bool {
        self.sources.get(span.file).name.starts_with("std:")
    }

    pub(super) fn unused(&mut self) {
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
}

/// A milter's address: `inet:HOST:PORT` (an IPv6 host in brackets) or `unix:/absolute/path`.
pub fn milter_address(s: &str) -> Result<(), String> {
    if let Some(p) = s.strip_prefix("unix:") {
        return if p.starts_with('/') { Ok(()) } else { Err("a unix socket path must be absolute".into()) };
    }
    let Some(rest) = s.strip_prefix("inet:").or_else(|| s.strip_prefix("inet6:")) else {
        return Err("it must start with `inet:` or `unix:`".into());
    };
    let (host, port) = rest.rsplit_once(':').ok_or("it needs a port")?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err("it needs a host".into());
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(format!("`{port}` is not a port")),
    }
}

/// A declaration's checked options into the typed struct of its kind (`crate::resources`).
fn lower_options(kw: ast::ResourceKw, kind: &str, opts: &[(String, OptValue)]) -> Options {
    let table = TableOptions::default;
    let mut out = match (kw, kind) {
        (ast::ResourceKw::Table, "ldap") => Options::Ldap(table(), LdapOptions::default()),
        (ast::ResourceKw::Table, "sql") => Options::Sql(table(), SqlOptions::default()),
        (ast::ResourceKw::Table, _) => Options::File(table()),
        (ast::ResourceKw::Scanner, "milter") => Options::Milter(MilterOptions::default()),
        (ast::ResourceKw::Scanner, _) => Options::Scanner(ScannerOptions::default()),
        (ast::ResourceKw::MailingList, _) => Options::MailingList(MailingListOptions::default()),
        (ast::ResourceKw::Secret, _) => Options::None,
    };
    for (k, v) in opts {
        out.set(k, v);
    }
    if let Options::Sql(_, sql) = &mut out {
        sql.dsn = crate::resources::pg_url(&sql.url).unwrap_or_default();
    }
    out
}
