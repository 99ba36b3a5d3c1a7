//! Variables and statements: stage blocks, `if`, `use`, `set`, and the flow of a block.

use super::*;

impl<'s> Checker<'s> {
    // ---- variables ------------------------------------------------------------------

    pub(super) fn collect_sets(&mut self, body: &[Stmt], stage: Stage, expanding: &mut Vec<String>) {
        for s in body {
            match s {
                Stmt::If { arms, otherwise, .. } => {
                    for (_, b) in arms {
                        self.collect_sets(b, stage, expanding);
                    }
                    if let Some(b) = otherwise {
                        self.collect_sets(b, stage, expanding);
                    }
                }
                Stmt::Action { name, args, .. } => {
                    if name.name == "set" {
                        if let Some(Arg::Value(Value { kind: ValueKind::Path(v), span })) = args.first() {
                            self.define_var(v, stage, *span);
                        }
                    } else if name.name == "use" {
                        if let Some(Arg::Value(Value { kind: ValueKind::Path(r), .. })) = args.first() {
                            if !expanding.contains(r) {
                                if let Some(body) = self.rules.get(r).cloned() {
                                    expanding.push(r.clone());
                                    self.collect_sets(&body, stage, expanding);
                                    expanding.pop();
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    pub(super) fn define_var(&mut self, name: &str, stage: Stage, span: Span) {
        let next = VarId(self.vars.len() as u32);
        let scope = match stage {
            Stage::Connect | Stage::Helo | Stage::Auth => Scope::Session,
            Stage::Mail | Stage::Rcpt | Stage::Data => Scope::Transaction,
            _ => Scope::Message,
        };
        let v = self.vars.entry(name.to_string()).or_insert_with(|| VarInfo { id: next, first_set: None, read: false });
        if v.first_set.is_none_or(|(s, _)| stage < s) {
            v.first_set = Some((stage, span));
        }
        let id = v.id;
        if id.index() == self.prog.vars.len() {
            self.prog.vars.push(Var { name: name.to_string(), scope });
        } else if let Some(var) = self.prog.vars.get_mut(id.index()) {
            // A variable set in several stages lives as long as its earliest setter's scope.
            if (scope as u8) < (var.scope as u8) {
                var.scope = scope;
            }
        }
    }

    /// Read a variable in `ctx`: it must be set somewhere at or before this stage.
    pub(super) fn read_var(&mut self, name: &str, span: Span, ctx: Ctx) -> Option<VarId> {
        let Some(v) = self.vars.get_mut(name) else {
            if self.unparsed.names.contains(name) {
                return None;
            }
            let cands: Vec<String> = self.vars.keys().cloned().collect();
            let mut d = Diagnostic::error("mailc::undefined", format!("`{name}` is never set"))
                .at(span)
                .label("no `set` for this name");
            d = match did_you_mean(name, cands.iter().map(String::as_str)) {
                Some(s) => d.help(format!("did you mean `{s}`?")),
                None => d.help(format!("set it in an earlier stage: `set {name};`")),
            };
            self.err(d);
            return None;
        };
        v.read = true;
        let id = v.id;
        if let Some((first, set_span)) = v.first_set {
            if first > ctx.stage {
                let d = Diagnostic::error("mailc::stage", format!("`{name}` is read in `{}` but first set in `{}`", ctx.stage.name(), first.name()))
                    .at(span)
                    .related(set_span, format!("set here, in `{}`", first.name()))
                    .help(format!("a variable can be read in the stage that sets it and in later stages; move the `set` to `{}` or earlier", ctx.stage.name()));
                self.err(self.via(d, ctx));
            }
        }
        Some(id)
    }

    pub(super) fn via(&self, d: Diagnostic, ctx: Ctx) -> Diagnostic {
        match ctx.via {
            Some(s) => d.related(s, format!("used in `{}` here", ctx.stage.name())),
            None => d,
        }
    }

    // ---- stages and statements ----------------------------------------------------

    pub(super) fn stage_block(&mut self, stage: Stage, body: &[Stmt], _span: Span) {
        if let Some(end) = self.stage_ended[stage.index()] {
            if let Some(first) = body.first() {
                self.diags.push(
                    Diagnostic::warning("mailc::unreachable", format!("this `{}` block never runs", stage.name()))
                        .at(first.span())
                        .related(end, "an earlier block of this stage always ends here")
                        .help("remove it, or make the earlier rule conditional"),
                );
            }
        }
        let mut code = std::mem::take(&mut self.prog.stages[stage.index()]);
        let flow = self.stmts(body, Ctx { stage, via: None }, &mut code);
        self.prog.stages[stage.index()] = code;
        if flow == Flow::Ends && self.stage_ended[stage.index()].is_none() {
            self.stage_ended[stage.index()] = body.last().map(Stmt::span);
        }
    }

    pub(super) fn stmts(&mut self, body: &[Stmt], ctx: Ctx, code: &mut Vec<Instr>) -> Flow {
        let mut flow = Flow::Continues;
        let mut ended_at: Option<Span> = None;
        for s in body {
            if flow == Flow::Ends {
                if let Some(end) = ended_at {
                    self.diags.push(
                        Diagnostic::warning("mailc::unreachable", "this statement is never reached")
                            .at(s.span())
                            .related(end, "the stage always ends here")
                            .help("remove it, or move it before the action that ends the stage"),
                    );
                }
                ended_at = None; // warn once per block
                                 // Still check it, so its errors are reported too.
                let mut scratch = Vec::new();
                self.stmt(s, ctx, &mut scratch);
                continue;
            }
            if self.stmt(s, ctx, code) == Flow::Ends {
                flow = Flow::Ends;
                ended_at = Some(s.span());
            }
        }
        flow
    }

    pub(super) fn stmt(&mut self, s: &Stmt, ctx: Ctx, code: &mut Vec<Instr>) -> Flow {
        match s {
            Stmt::If { arms, otherwise, .. } => {
                let mut exits = Vec::new();
                let mut all_end = true;
                for (cond, body) in arms {
                    let e = self.cond(cond, ctx);
                    let loc = self.loc(cond.span());
                    let at = code.len();
                    code.push(Instr::If { cond: e, else_pc: 0, loc });
                    if self.stmts(body, ctx, code) != Flow::Ends {
                        all_end = false;
                    }
                    exits.push(code.len());
                    code.push(Instr::Jump(0));
                    let next = code.len() as u32;
                    if let Instr::If { else_pc, .. } = &mut code[at] {
                        *else_pc = next;
                    }
                }
                match otherwise {
                    Some(b) => {
                        if self.stmts(b, ctx, code) != Flow::Ends {
                            all_end = false;
                        }
                    }
                    None => all_end = false,
                }
                let end = code.len() as u32;
                for e in exits {
                    code[e] = Instr::Jump(end);
                }
                if all_end {
                    Flow::Ends
                } else {
                    Flow::Continues
                }
            }
            Stmt::Action { name, args, span } => {
                if name.name == "use" {
                    return self.use_rules(args, *span, ctx, code);
                }
                match self.action(name, args, *span, ctx) {
                    Some(action) => {
                        let terminal = action.is_terminal();
                        let loc = self.loc(*span);
                        code.push(Instr::Do { action, loc });
                        if terminal {
                            Flow::Ends
                        } else {
                            Flow::Continues
                        }
                    }
                    None => Flow::Continues,
                }
            }
        }
    }

    pub(super) fn use_rules(&mut self, args: &[Arg], span: Span, ctx: Ctx, code: &mut Vec<Instr>) -> Flow {
        let Some(Arg::Value(Value { kind: ValueKind::Path(name), span: nspan })) = args.first() else {
            self.err(
                Diagnostic::error("mailc::arguments", "`use` needs the name of a rules block")
                    .at(span)
                    .help("rules spam_checks { ... }  then  use spam_checks;"),
            );
            return Flow::Continues;
        };
        if args.len() > 1 {
            self.err(Diagnostic::error("mailc::arguments", "`use` takes one name").at(args[1].span()));
        }
        self.use_sym(name, *nspan, &["rules block"]);
        if self.expanding.contains(name) {
            self.err(
                Diagnostic::error("mailc::recursion", format!("rules block `{name}` uses itself"))
                    .at(*nspan)
                    .help("a rules block cannot use itself, directly or through another"),
            );
            return Flow::Continues;
        }
        let Some(body) = self.rules.get(name).cloned() else {
            return Flow::Continues;
        };
        self.expanding.push(name.clone());
        let flow = self.stmts(&body, Ctx { stage: ctx.stage, via: Some(ctx.via.unwrap_or(span)) }, code);
        self.expanding.pop();
        flow
    }
}
