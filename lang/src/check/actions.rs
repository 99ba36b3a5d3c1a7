//! Actions: their arguments, replies and transports.

use super::*;

impl<'s> Checker<'s> {
    // ---- actions ----------------------------------------------------------------------

    pub(super) fn action(&mut self, name: &ast::Ident, args: &[Arg], span: Span, ctx: Ctx) -> Option<Action> {
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

    pub(super) fn check_address_literal(&mut self, v: &Value) {
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

    pub(super) fn reply(&mut self, a: &mut ArgCursor, reject: bool, ctx: Ctx, span: Span) -> Option<Reply> {
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

    pub(super) fn transport(&mut self, a: &mut ArgCursor, ctx: Ctx, filter: bool) -> Option<Transport> {
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
        let mut cert = None;
        let mut key = None;
        let mut cert_span = kspan;
        while let Some(tag) = a.peek_tag() {
            let tspan = tag.span;
            match tag.name.as_str() {
                "tls" => {
                    a.next();
                    let (m, mspan) = a.word(self, "required, may, none, implicit, dane or sts")?;
                    tls = match m.as_str() {
                        "required" => TlsMode::Required,
                        "may" => TlsMode::May,
                        "none" => TlsMode::None,
                        "implicit" => {
                            if kind != TransportKind::Smtp {
                                self.err(
                                    Diagnostic::error(
                                        "mailc::arguments",
                                        "`:tls implicit` is for smtp to a host that speaks TLS from the start",
                                    )
                                    .at(mspan)
                                    .help("deliver smtp \"[smtp.example.net]:465\" :tls implicit;"),
                                );
                            }
                            TlsMode::Implicit
                        }
                        "dane" | "sts" => {
                            if !matches!(kind, TransportKind::Smtp | TransportKind::Mx) {
                                self.err(
                                    Diagnostic::error(
                                        "mailc::arguments",
                                        format!("`:tls {m}` is for SMTP delivery (smtp, mx)"),
                                    )
                                    .at(mspan)
                                    .help("deliver mx :tls dane;"),
                                );
                            }
                            if m == "dane" {
                                TlsMode::Dane
                            } else {
                                TlsMode::Sts
                            }
                        }
                        _ => {
                            self.err(
                                Diagnostic::error(
                                    "mailc::arguments",
                                    format!("`:tls {m}`: expected required, may, none, implicit, dane or sts"),
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
                "cert" | "key" => {
                    a.next();
                    let what = if tag.name == "cert" {
                        "the PEM file of the client certificate chain"
                    } else {
                        "the PEM file of the client certificate's private key"
                    };
                    let (file, fspan) = a.plain_string(self, what)?;
                    if !matches!(kind, TransportKind::Smtp | TransportKind::Mx) {
                        self.err(
                            Diagnostic::error(
                                "mailc::arguments",
                                format!("`:{}` is for TLS to another SMTP server (smtp, mx)", tag.name),
                            )
                            .at(tspan),
                        );
                    }
                    if file.trim().is_empty() {
                        self.err(
                            Diagnostic::error("mailc::arguments", format!("`:{}` needs a file name", tag.name))
                                .at(fspan),
                        );
                    }
                    cert_span = tspan;
                    if tag.name == "cert" {
                        cert = Some(self.intern(&file));
                    } else {
                        key = Some(self.intern(&file));
                    }
                }
                other => {
                    self.err(
                        Diagnostic::error("mailc::arguments", format!("`{k}` has no option `:{other}`"))
                            .at(tspan)
                            .help("options: :tls required|may|none|implicit, :auth SECRET, :ca \"FILE\", :cert \"FILE\" :key \"FILE\""),
                    );
                    a.next();
                }
            }
        }
        let cert = match (cert, key) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            (c, _) => {
                self.err(
                    Diagnostic::error(
                        "mailc::arguments",
                        if c.is_some() { "`:cert` without `:key`" } else { "`:key` without `:cert`" },
                    )
                    .at(cert_span)
                    .help("a client certificate is a pair: :cert \"client.pem\" :key \"client.key\""),
                );
                None
            }
        };
        Some(Transport { kind, dest, tls, auth, ca, cert })
    }
}

pub(super) fn check_host(c: &mut Checker, s: &str, span: Span, kind: TransportKind) {
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
