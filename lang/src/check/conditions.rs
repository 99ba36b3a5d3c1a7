//! Conditions: facts, terms, tests and comparisons, lowered to expressions.

use super::*;

impl<'s> Checker<'s> {
    // ---- conditions -------------------------------------------------------------------

    pub(super) fn push_expr(&mut self, e: Expr) -> ExprId {
        self.prog.exprs.push(e);
        ExprId(self.prog.exprs.len() as u32 - 1)
    }

    pub(super) fn cond(&mut self, c: &Cond, ctx: Ctx) -> ExprId {
        let e = self.cond_expr(c, ctx);
        self.push_expr(e)
    }

    pub(super) fn cond_expr(&mut self, c: &Cond, ctx: Ctx) -> Expr {
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

    pub(super) fn stage_check(&mut self, what: &str, available: Stages, span: Span, ctx: Ctx) -> bool {
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
    pub(super) fn path_val(&mut self, path: &str, span: Span, ctx: Ctx) -> Option<(Val, Ty)> {
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

    pub(super) fn unknown_term(&mut self, name: &str, span: Span) {
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

    pub(super) fn term(&mut self, t: &ast::Term, ctx: Ctx) -> Option<Term> {
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
    pub(super) fn check_rate_key(&mut self, key: &Val, span: Span) {
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

    pub(super) fn check_zone(&mut self, zone: &str, span: Span) {
        if zone.is_empty() || zone.contains(char::is_whitespace) || zone.contains('@') || zone.starts_with('.') {
            self.err(
                Diagnostic::error("mailc::arguments", format!("\"{zone}\" is not a DNS zone"))
                    .at(span)
                    .help("write the list's zone, e.g. \"zen.spamhaus.org\""),
            );
        }
    }

    pub(super) fn test(
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

    pub(super) fn num_op_error(&self, name: &str, ty: Ty, op: Op, span: Span) -> Diagnostic {
        Diagnostic::error("mailc::type", format!("`{name}` is {}; `{}` compares strings", ty.name(), op.as_str()))
            .at(span)
            .help("compare numbers, sizes and durations with ==, !=, <, <=, > or >=")
    }

    pub(super) fn number_for(&mut self, ty: Ty, v: &Value) -> Option<f64> {
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
}
