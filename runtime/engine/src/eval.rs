//! The IR evaluator: runs one stage's program over the facts of a session, a transaction
//! or a queued recipient. It does no I/O: when a rule needs the outside world it returns
//! [`Step::Need`] with a [`Request`]; the host answers with [`Run::answer`] and calls
//! [`Run::step`] again. The daemon answers from the network, `mailc test` from fixtures.
//!
//! Resumption is by re-evaluation: expressions are pure, answers are cached in the run,
//! so after an answer arrives the pending condition is evaluated again from its start and
//! finds the answer in the cache. Actions before it are not run twice (the program counter
//! only moves forward).
//!
//! Every verdict carries the deciding rule's location, the effects of the non-terminal
//! actions that ran, and a trace of each test and lookup for `mailc explain`.

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::IpAddr;

use mailpolicy_lang::ir::*;
use mailpolicy_lang::resources::{OnError, Options};
use mailpolicy_stdlib::access::{self, AccessAction};
use mailpolicy_stdlib::address as addr;

use crate::smtp;

mod facts;
mod host;
mod message;
mod replies;

pub use facts::*;
pub use host::*;
pub use message::*;
use replies::{reply_of, split_enhanced};
pub use replies::{soft_bounce, soft_bounce_line};

enum Halt {
    Need(Asked),
    /// A back end failed and the policy did not choose fail-open.
    Fail(String),
}

/// What a stage waits for: a host's answer, or a session's sender-authentication word.
enum Asked {
    Host(Request),
    SenderAuth(AuthCheck),
}

#[derive(Clone, Debug, PartialEq)]
enum V {
    Bool(bool),
    Str(String),
    List(Vec<String>),
    Ip(IpAddr),
    Num(f64),
}

impl V {
    /// The value as the strings a test compares: borrowed for a string or a list (the
    /// common case, no copy), made for the others.
    fn strings(&self) -> Cow<'_, [String]> {
        match self {
            V::Bool(b) => Cow::Owned(vec![b.to_string()]),
            V::Str(s) => Cow::Borrowed(std::slice::from_ref(s)),
            V::List(l) => Cow::Borrowed(l.as_slice()),
            V::Ip(ip) => Cow::Owned(vec![ip.to_string()]),
            V::Num(n) => Cow::Owned(vec![fmt_num(*n)]),
        }
    }
    fn render(self) -> String {
        match self {
            V::Str(s) => s,
            V::List(l) => l.join(", "),
            other => other.strings().concat(),
        }
    }
}

fn fmt_num(n: f64) -> String {
    if n.fract() == 0.0 && n.abs() < 1e15 {
        format!("{}", n as i64)
    } else {
        format!("{n}")
    }
}

/// One evaluation of one stage.
pub struct Run {
    stage: Stage,
    pc: usize,
    answers: HashMap<Request, Answer>,
    sender_auth: HashMap<AuthCheck, Answer>,
    effects: Vec<Effect>,
    trace: Vec<Trace>,
    /// Whether to keep the trace (`mailc test`/`explain` read it; the daemon does not).
    tracing: bool,
    /// Requests issued so far (bounded by `max_lookups`).
    pub lookups: u32,
    max_lookups: u32,
    /// The `If` being evaluated, for failure verdicts.
    current: Option<LocId>,
}

impl Run {
    pub fn new(prog: &Program, stage: Stage) -> Run {
        Run::with_budget(stage, prog.server.max_lookups.min(u32::MAX as u64) as u32)
    }

    pub fn with_budget(stage: Stage, max_lookups: u32) -> Run {
        Run {
            stage,
            pc: 0,
            answers: HashMap::new(),
            sender_auth: HashMap::new(),
            effects: Vec::new(),
            trace: Vec::new(),
            tracing: true,
            lookups: 0,
            max_lookups,
            current: None,
        }
    }

    pub fn stage(&self) -> Stage {
        self.stage
    }

    /// A run that keeps no trace: its verdict's `trace` is empty. For a host that never
    /// reads traces (the daemon), which then pays no copy of each request and answer.
    pub fn untraced(mut self) -> Run {
        self.tracing = false;
        self
    }

    fn traced(&mut self, t: impl FnOnce() -> Trace) {
        if self.tracing {
            self.trace.push(t());
        }
    }

    /// Give the answer to the request the last [`Step::Need`] asked.
    pub fn answer(&mut self, request: Request, answer: Answer) {
        self.traced(|| Trace::Lookup { request: request.clone(), answer: answer.clone() });
        self.answers.insert(request, answer);
    }

    /// Give the sender-authentication word `Conn` has for the check the last
    /// [`SessionStep::SenderAuth`] asked.
    pub fn answer_sender_auth(&mut self, check: AuthCheck, answer: Answer) {
        self.traced(|| Trace::SenderAuth { check, answer: answer.clone() });
        self.sender_auth.insert(check, answer);
    }

    /// Run until the stage ends or the host is needed, outside a session (the queue side:
    /// `spf`, `dkim`, `dmarc` are the session's record, `Facts::recorded_auth`; a check the
    /// record does not hold reads `temperror`, as a check that failed).
    pub fn step(&mut self, prog: &Program, facts: &Facts, state: &mut State) -> Step {
        loop {
            match self.step_session(prog, facts, state) {
                SessionStep::Need(r) => return Step::Need(r),
                SessionStep::Done(v) => return Step::Done(v),
                SessionStep::SenderAuth(c) => self.answer_sender_auth(c, Answer::Error("no session".into())),
            }
        }
    }

    /// Run until the stage ends, the host is needed, or (in a session) `Conn`'s sender
    /// authentication.
    pub fn step_session(&mut self, prog: &Program, facts: &Facts, state: &mut State) -> SessionStep {
        let code = prog.stage(self.stage);
        loop {
            let Some(instr) = code.get(self.pc) else {
                return SessionStep::Done(self.finish(Outcome::Default, None));
            };
            match instr {
                Instr::Jump(t) => self.pc = *t as usize,
                Instr::If { cond, else_pc, loc } => {
                    self.current = Some(*loc);
                    match self.expr(prog, facts, state, *cond) {
                        Ok(b) => {
                            self.traced(|| Trace::Test { loc: *loc, result: b });
                            self.pc = if b { self.pc + 1 } else { *else_pc as usize };
                        }
                        Err(Halt::Need(r)) => return self.need(r, *loc),
                        Err(Halt::Fail(msg)) => return SessionStep::Done(self.fail(msg, *loc)),
                    }
                }
                Instr::Do { action, loc } => {
                    self.current = Some(*loc);
                    match self.act(prog, facts, state, action) {
                        Ok(None) => {
                            self.traced(|| Trace::Action { loc: *loc });
                            self.pc += 1;
                        }
                        Ok(Some(outcome)) => {
                            self.traced(|| Trace::Action { loc: *loc });
                            return SessionStep::Done(self.finish(outcome, Some(*loc)));
                        }
                        Err(Halt::Need(r)) => return self.need(r, *loc),
                        Err(Halt::Fail(msg)) => return SessionStep::Done(self.fail(msg, *loc)),
                    }
                }
            }
        }
    }

    fn need(&mut self, r: Asked, loc: LocId) -> SessionStep {
        self.lookups += 1;
        if self.lookups > self.max_lookups {
            let reply = smtp::Reply::new(451, (4, 3, 0), "Policy lookup budget exceeded, try again later");
            return SessionStep::Done(self.finish(Outcome::Tempfail(reply), Some(loc)));
        }
        match r {
            Asked::Host(r) => SessionStep::Need(r),
            Asked::SenderAuth(c) => SessionStep::SenderAuth(c),
        }
    }

    fn fail(&mut self, msg: String, loc: LocId) -> StageVerdict {
        self.effects.push(Effect::Log(format!("lookup failed: {msg}")));
        // At connect a 4xx other than 421 would leave the client in limbo: close instead.
        let code = if self.stage == Stage::Connect { 421 } else { 451 };
        let reply = smtp::Reply::new(code, (4, 4, 3), "Temporary lookup failure, try again later");
        self.finish(Outcome::Tempfail(reply), Some(loc))
    }

    fn finish(&mut self, outcome: Outcome, decided_by: Option<LocId>) -> StageVerdict {
        StageVerdict {
            outcome,
            decided_by,
            effects: std::mem::take(&mut self.effects),
            trace: std::mem::take(&mut self.trace),
        }
    }

    // ---- answers ----------------------------------------------------------------------

    fn ask(&self, r: Request) -> Result<&Answer, Halt> {
        match self.answers.get(&r) {
            Some(a) => Ok(a),
            None => Err(Halt::Need(Asked::Host(r))),
        }
    }

    /// Table lookup honouring the table's `on_error`.
    fn lookup(&self, prog: &Program, table: TableId, key: &str) -> Result<Option<String>, Halt> {
        let r = Request::Lookup { table, key: key.to_string() };
        match self.ask(r.clone())? {
            Answer::Value(v) => Ok(v.clone()),
            Answer::Records(v) => Ok(v.first().cloned()),
            Answer::Bool(true) => Ok(Some(String::new())),
            Answer::Bool(false) | Answer::NxDomain => Ok(None),
            Answer::Error(e) => self.on_error(prog, &r, e),
            Answer::Timeout => self.on_error(prog, &r, "timed out"),
            other => Err(Halt::Fail(format!("unexpected answer {other:?} to a table lookup"))),
        }
    }

    fn on_error<T: Default>(&self, prog: &Program, r: &Request, e: &str) -> Result<T, Halt> {
        let fail_open = r
            .table()
            .and_then(|t| prog.tables.get(t.index()))
            .and_then(|t| t.options.table())
            .is_some_and(|o| o.on_error == OnError::Continue);
        let name = r.table().and_then(|t| prog.tables.get(t.index())).map(|t| t.name.clone()).unwrap_or_default();
        if fail_open {
            Ok(T::default())
        } else {
            Err(Halt::Fail(format!("table {name}: {e}")))
        }
    }

    fn dns(&self, name: &str, rtype: RrType) -> Result<DnsResult, Halt> {
        Ok(match self.ask(Request::Dns { name: name.to_string(), rtype })? {
            Answer::Records(r) => DnsResult::Found(r.clone()),
            Answer::NxDomain | Answer::Value(None) => DnsResult::None,
            Answer::Value(Some(v)) => DnsResult::Found(vec![v.clone()]),
            Answer::Error(e) => DnsResult::TempError(e.clone()),
            Answer::Timeout => DnsResult::TempError("timed out".into()),
            other => DnsResult::TempError(format!("unexpected answer {other:?}")),
        })
    }

    fn count(&self, r: Request) -> Result<f64, Halt> {
        match self.ask(r)? {
            Answer::Count(n) => Ok(*n as f64),
            Answer::Error(e) => Err(Halt::Fail(e.clone())),
            Answer::Timeout => Err(Halt::Fail("rate store timed out".into())),
            other => Err(Halt::Fail(format!("unexpected answer {other:?} to a counter"))),
        }
    }

    // ---- values -----------------------------------------------------------------------

    fn val(&mut self, prog: &Program, f: &Facts, st: &mut State, v: &Val) -> Result<V, Halt> {
        Ok(match v {
            Val::Fact(fact) => self.fact(f, st, *fact)?,
            Val::Var(id) => V::Str(st.vars.get(id.index()).cloned().flatten().unwrap_or_default()),
            Val::Header(name) => V::List(f.message.as_ref().map(|m| m.header(prog.str(*name))).unwrap_or_default()),
            // A milter's answer (`milter.NAME.verdict`): its pseudo-table, answered from
            // the facts Conn set before the stage, never by the host.
            Val::Lookup { table, key } if prog.tables.get(table.index()).is_some_and(|t| t.kind == "milter") => {
                let k = self.val(prog, f, st, key)?.render();
                let name = prog.tables.get(table.index()).map(|t| t.name.trim_start_matches("milter.")).unwrap_or("");
                let m = f.milters.iter().find(|m| m.name == name);
                V::Str(match k.as_str() {
                    "verdict" => m.map(|m| m.verdict.clone()).unwrap_or_else(|| "continue".into()),
                    _ => m.map(|m| m.reply.clone()).unwrap_or_default(),
                })
            }
            Val::Lookup { table, key } => {
                let k = self.val(prog, f, st, key)?.render();
                V::Str(self.lookup(prog, *table, &k)?.unwrap_or_default())
            }
            Val::Rate { counter, key, window_ms } => {
                let k = self.rate_key(prog, f, st, key)?;
                V::Num(self.count(Request::Rate { counter: *counter, key: k, window_ms: *window_ms })?)
            }
            Val::Concurrent { key } => {
                let k = self.rate_key(prog, f, st, key)?;
                V::Num(self.count(Request::Concurrent { key: k })?)
            }
            Val::Score(s) => {
                let r = Request::Scan { scanner: *s };
                match self.ask(r)? {
                    Answer::Score(x) => V::Num(*x),
                    Answer::Error(e) | Answer::Value(Some(e)) => {
                        let open = prog.scanners.get(s.index()).is_some_and(
                            |s| matches!(&s.options, Options::Scanner(o) if o.on_error == OnError::Continue),
                        );
                        if open {
                            V::Num(0.0)
                        } else {
                            return Err(Halt::Fail(format!("scanner: {e}")));
                        }
                    }
                    _ => return Err(Halt::Fail("scanner did not answer".into())),
                }
            }
            Val::Lit(s) => V::Str(prog.str(*s).to_string()),
        })
    }

    /// `client.ip=192.0.2.1`: counters are kept per fact and value (see [`event_keys`]).
    fn rate_key(&mut self, prog: &Program, f: &Facts, st: &mut State, key: &Val) -> Result<String, Halt> {
        let v = self.val(prog, f, st, key)?.render();
        let name = match key {
            Val::Fact(x) => x.info().name,
            _ => "value",
        };
        let mut k = String::with_capacity(name.len() + 1 + v.len());
        k.push_str(name);
        k.push('=');
        k.extend(v.chars().map(|c| c.to_ascii_lowercase()));
        Ok(k)
    }

    fn fact(&mut self, f: &Facts, st: &State, fact: Fact) -> Result<V, Halt> {
        let s = |x: &str| V::Str(x.to_string());
        let rcpt = f.recipient.as_ref();
        let sender = f.sender.as_deref().unwrap_or("");
        Ok(match fact {
            Fact::True => V::Bool(true),
            Fact::False => V::Bool(false),
            Fact::ClientIp => V::Ip(f.client_ip),
            Fact::ClientPort => V::Num(f.client_port as f64),
            Fact::ClientName => s(&f.client_name),
            Fact::ClientPtr => s(&f.client_ptr),
            Fact::ClientNetwork => V::Str(client_network(f.client_ip)),
            Fact::ClientFcrdns => V::Bool(f.client_fcrdns),
            Fact::LocalIp => V::Ip(f.local_ip),
            Fact::LocalPort => V::Num(f.local_port as f64),
            Fact::Listener => s(&f.listener),
            Fact::SessionId => s(&f.session_id),
            Fact::SessionErrors => V::Num(f.session_errors as f64),
            Fact::Tls => V::Bool(f.tls.is_some()),
            Fact::TlsVersion => s(f.tls.as_ref().map(|t| t.version.as_str()).unwrap_or("")),
            Fact::TlsCipher => s(f.tls.as_ref().map(|t| t.cipher.as_str()).unwrap_or("")),
            Fact::TlsClientCert => V::Bool(f.tls.as_ref().is_some_and(|t| t.client_cert)),
            Fact::TlsClientFingerprint => s(f.tls.as_ref().map(|t| t.client_fingerprint.as_str()).unwrap_or("")),
            Fact::HeloName => s(f.helo.as_ref().map(|h| h.0.as_str()).unwrap_or("")),
            Fact::HeloExtended => V::Bool(f.helo.as_ref().is_some_and(|h| h.1)),
            Fact::Authenticated => V::Bool(f.auth.is_some()),
            Fact::AuthUser => s(f.auth.as_ref().map(|a| a.0.as_str()).unwrap_or("")),
            Fact::AuthMechanism => s(f.auth.as_ref().map(|a| a.1.as_str()).or(f.auth_failed.as_deref()).unwrap_or("")),
            Fact::Sender => s(sender),
            Fact::SenderLocal => s(addr::split(sender).0),
            Fact::SenderDomain => V::Str(addr::split(sender).1),
            Fact::MailSize => V::Num(f.mail_size as f64),
            Fact::MailBody => s(&f.mail_body),
            Fact::MailSmtputf8 => V::Bool(f.smtputf8),
            Fact::DsnRet => s(&f.dsn_ret),
            Fact::DsnEnvid => s(&f.dsn_envid),
            Fact::Recipient => s(rcpt.map(|r| r.address.as_str()).unwrap_or("")),
            Fact::RecipientLocal => s(rcpt.map(|r| addr::split(&r.address).0).unwrap_or("")),
            Fact::RecipientDomain => V::Str(rcpt.map(|r| addr::split(&r.address).1).unwrap_or_default()),
            Fact::RecipientDetail => s(rcpt.map(|r| addr::detail(addr::split(&r.address).0)).unwrap_or("")),
            Fact::RecipientIsLocal => {
                let d = rcpt.map(|r| addr::split(&r.address).1).unwrap_or_default();
                V::Bool(d.is_empty() || f.local_domains.iter().any(|p| addr::domain_matches(p, &d)))
            }
            Fact::RecipientRouting => {
                V::Bool(rcpt.is_some_and(|r| r.routing || addr::has_routing(addr::split(&r.address).0)))
            }
            Fact::DsnNotify => V::List(rcpt.map(|r| r.notify.clone()).unwrap_or_default()),
            Fact::DsnOrcpt => s(rcpt.map(|r| r.orcpt.as_str()).unwrap_or("")),
            Fact::RecipientsCount => V::Num(f.recipients.len() as f64),
            Fact::Recipients => V::List(f.recipients.clone()),
            Fact::MessageSize => V::Num(f.message.as_ref().map(|m| m.size).unwrap_or(0) as f64),
            // Matched line by line, each line without its line ending, as Postfix's
            // body_checks do: `$` anchors at the end of a line (R41).
            Fact::Body => {
                V::List(f.message.as_ref().map(|m| m.body.lines().map(str::to_string).collect()).unwrap_or_default())
            }
            Fact::AttachmentNames => {
                V::List(f.message.as_ref().map(|m| m.attachment_names.clone()).unwrap_or_default())
            }
            Fact::AttachmentTypes => {
                V::List(f.message.as_ref().map(|m| m.attachment_types.clone()).unwrap_or_default())
            }
            Fact::QueueId => s(&f.queue_id),
            Fact::Spf => self.auth_check(f, AuthCheck::Spf)?,
            Fact::Dkim => self.auth_check(f, AuthCheck::Dkim)?,
            Fact::Dmarc => self.auth_check(f, AuthCheck::Dmarc)?,
            Fact::DmarcPolicy => self.auth_check(f, AuthCheck::DmarcPolicy)?,
            Fact::DnsblZone => s(st.dnsbl_hit.as_ref().map(|h| h.0.as_str()).unwrap_or("")),
            Fact::DnsblAnswer => s(st.dnsbl_hit.as_ref().map(|h| h.1.as_str()).unwrap_or("")),
            Fact::DnsblText => s(st.dnsbl_hit.as_ref().map(|h| h.2.as_str()).unwrap_or("")),
            Fact::CallaheadCode => V::Num(st.callahead.as_ref().map(|c| c.0).unwrap_or(0) as f64),
            Fact::CallaheadText => s(st.callahead.as_ref().map(|c| c.1.as_str()).unwrap_or("")),
            Fact::DeliveryCode => V::Num(f.delivery.as_ref().map(|d| d.code).unwrap_or(0) as f64),
            Fact::DeliveryStatus => s(f.delivery.as_ref().map(|d| d.status.as_str()).unwrap_or("")),
            Fact::DeliveryText => s(f.delivery.as_ref().map(|d| d.text.as_str()).unwrap_or("")),
            Fact::DeliveryHost => s(f.delivery.as_ref().map(|d| d.host.as_str()).unwrap_or("")),
            Fact::DeliveryAttempts => V::Num(f.delivery.as_ref().map(|d| d.attempts).unwrap_or(0) as f64),
            Fact::QueueAge => V::Num(f.queue_age_ms as f64),
            Fact::BounceType => s(f.bounce.as_ref().map(|b| b.0.as_str()).unwrap_or("")),
            Fact::BounceReason => s(f.bounce.as_ref().map(|b| b.1.as_str()).unwrap_or("")),
            Fact::TimeHour => V::Num(((f.now_ms / 3_600_000) % 24) as f64),
        })
    }

    fn auth_check(&self, f: &Facts, c: AuthCheck) -> Result<V, Halt> {
        // The queue side reads what the session computed; a check no stage of the session
        // made reads temperror there (the message is gone from the connection).
        if let Some(r) = &f.recorded_auth {
            return Ok(V::Str(r.get(c).unwrap_or("temperror").to_string()));
        }
        let answer = match self.sender_auth.get(&c) {
            Some(a) => a,
            None => return Err(Halt::Need(Asked::SenderAuth(c))),
        };
        match answer {
            Answer::Value(v) => Ok(V::Str(v.clone().unwrap_or_else(|| "none".into()).to_ascii_lowercase())),
            Answer::Error(_) | Answer::Timeout => Ok(V::Str("temperror".into())),
            _ => Ok(V::Str("none".into())),
        }
    }

    fn render(&mut self, prog: &Program, f: &Facts, st: &mut State, t: &Template) -> Result<String, Halt> {
        let mut out = String::new();
        for p in &t.0 {
            match p {
                Part::Lit(s) => out.push_str(prog.str(*s)),
                Part::Val(v) => {
                    let text = self.val(prog, f, st, v)?.render();
                    // Interpolated peer data never breaks a reply or a header line.
                    out.extend(text.chars().map(|c| if c.is_control() { ' ' } else { c }));
                }
            }
        }
        Ok(out)
    }

    /// [`Run::render`] without a copy for a template that is one literal (or empty), the
    /// common case of a pattern list.
    fn render_cow<'p>(
        &mut self,
        prog: &'p Program,
        f: &Facts,
        st: &mut State,
        t: &Template,
    ) -> Result<Cow<'p, str>, Halt> {
        match t.0.as_slice() {
            [] => Ok(Cow::Borrowed("")),
            [Part::Lit(s)] => Ok(Cow::Borrowed(prog.str(*s))),
            _ => self.render(prog, f, st, t).map(Cow::Owned),
        }
    }

    /// A file-system path: each interpolated value becomes one safe path component
    /// ([`crate::paths::component`]); when there is any interpolation, also the directory
    /// the literal prefix names, which the path must stay under.
    fn render_path(
        &mut self,
        prog: &Program,
        f: &Facts,
        st: &mut State,
        t: &Template,
    ) -> Result<(String, Option<String>), Halt> {
        let mut out = String::new();
        let mut prefix: Option<String> = None;
        for p in &t.0 {
            match p {
                Part::Lit(s) => out.push_str(prog.str(*s)),
                Part::Val(v) => {
                    if prefix.is_none() {
                        prefix = Some(out.clone());
                    }
                    let text = self.val(prog, f, st, v)?.render();
                    out.push_str(&crate::paths::component(&text));
                }
            }
        }
        let root = prefix.map(|p| {
            let p = p.trim_start().strip_prefix("unix:").unwrap_or(p.trim_start()).to_string();
            crate::paths::literal_root(&p).unwrap_or_default()
        });
        Ok((out, root))
    }

    // ---- conditions -------------------------------------------------------------------

    fn expr(&mut self, prog: &Program, f: &Facts, st: &mut State, id: ExprId) -> Result<bool, Halt> {
        let Some(e) = prog.exprs.get(id.index()) else {
            return Ok(false);
        };
        Ok(match e {
            Expr::Const(b) => *b,
            Expr::Not(i) => !self.expr(prog, f, st, *i)?,
            Expr::All(ids) => {
                for i in ids {
                    if !self.expr(prog, f, st, *i)? {
                        return Ok(false);
                    }
                }
                true
            }
            Expr::Any(ids) => {
                for i in ids {
                    if self.expr(prog, f, st, *i)? {
                        return Ok(true);
                    }
                }
                false
            }
            Expr::Truth(v) => matches!(self.val(prog, f, st, v)?, V::Bool(true)),
            Expr::Match { lhs, op, rhs } => {
                let lv = self.val(prog, f, st, lhs)?;
                let l = lv.strings();
                let mut pats: Vec<Cow<'_, str>> = Vec::with_capacity(rhs.len());
                for t in rhs {
                    pats.push(self.render_cow(prog, f, st, t)?);
                }
                match op {
                    MatchOp::Is => l.iter().any(|x| pats.iter().any(|p| x.eq_ignore_ascii_case(p))),
                    MatchOp::Contains => {
                        let pats: Vec<String> = pats.iter().map(|p| p.to_ascii_lowercase()).collect();
                        l.iter().any(|x| {
                            let x = x.to_ascii_lowercase();
                            pats.iter().any(|p| x.contains(p.as_str()))
                        })
                    }
                }
            }
            Expr::Pattern { lhs, pats } => {
                let lv = self.val(prog, f, st, lhs)?;
                lv.strings()
                    .iter()
                    .any(|x| pats.iter().any(|p| prog.patterns.get(p.index()).is_some_and(|p| p.regex.is_match(x))))
            }
            Expr::In { lhs, set } => {
                let l = self.val(prog, f, st, lhs)?;
                self.contains(prog, &l, set)?
            }
            Expr::Cmp { lhs, op, rhs } => {
                let n = match self.val(prog, f, st, lhs)? {
                    V::Num(n) => n,
                    V::Str(s) => s.trim().parse().unwrap_or(0.0),
                    _ => 0.0,
                };
                match op {
                    CmpOp::Eq => n == *rhs,
                    CmpOp::Ne => n != *rhs,
                    CmpOp::Lt => n < *rhs,
                    CmpOp::Le => n <= *rhs,
                    CmpOp::Gt => n > *rhs,
                    CmpOp::Ge => n >= *rhs,
                }
            }
            Expr::CmpVal { lhs, op, rhs } => {
                let num = |v: V| match v {
                    V::Num(n) => Some(n),
                    V::Str(s) => s.trim().parse::<f64>().ok().filter(|n| n.is_finite()),
                    _ => None,
                };
                let l = num(self.val(prog, f, st, lhs)?);
                let r = num(self.val(prog, f, st, rhs)?);
                match (l, r) {
                    (Some(n), Some(r)) => match op {
                        CmpOp::Eq => n == r,
                        CmpOp::Ne => n != r,
                        CmpOp::Lt => n < r,
                        CmpOp::Le => n <= r,
                        CmpOp::Gt => n > r,
                        CmpOp::Ge => n >= r,
                    },
                    _ => false,
                }
            }
            Expr::IsNull(v) => match self.val(prog, f, st, v)? {
                V::Str(s) => s.is_empty(),
                V::List(l) => l.is_empty(),
                _ => false,
            },
            Expr::Flag(id) => st.vars.get(id.index()).is_some_and(|v| v.is_some()),
            Expr::Dnsbl { zone, returns } => {
                let zone = prog.str(*zone);
                let Some(q) = reverse_ip(f.client_ip) else {
                    return Ok(false);
                };
                self.listed(prog, st, &format!("{q}.{zone}"), zone, returns)?
            }
            Expr::Rhsbl { zone, domain, returns } => {
                let d = self.val(prog, f, st, domain)?.render().trim_end_matches('.').to_ascii_lowercase();
                if d.is_empty() {
                    return Ok(false);
                }
                let zone = prog.str(*zone);
                self.listed(prog, st, &format!("{d}.{zone}"), zone, returns)?
            }
            Expr::Resolvable(v) => {
                let d = self.val(prog, f, st, v)?.render().trim_end_matches('.').to_ascii_lowercase();
                if d.is_empty() {
                    return Ok(false);
                }
                let mut temp = None;
                for t in [RrType::Mx, RrType::A, RrType::Aaaa] {
                    match self.dns(&d, t)? {
                        DnsResult::Found(r) if !r.is_empty() => return Ok(true),
                        DnsResult::Found(_) | DnsResult::None => {}
                        DnsResult::TempError(e) => temp = Some(e),
                    }
                }
                if let Some(e) = temp {
                    return Err(Halt::Fail(format!("DNS for {d}: {e}")));
                }
                false
            }
            Expr::Fqdn(v) => addr::is_fqdn(&self.val(prog, f, st, v)?.render()),
            Expr::BatvValid => {
                let a = f
                    .recipient
                    .as_ref()
                    .map(|r| r.batv_tagged.clone().unwrap_or_else(|| r.address.clone()))
                    .unwrap_or_default();
                match self.ask(Request::BatvValid { address: a })? {
                    Answer::Bool(b) => *b,
                    _ => false,
                }
            }
            Expr::Callahead => {
                let a = f.recipient.as_ref().map(|r| r.address.clone()).unwrap_or_default();
                match self.ask(Request::Callahead { recipient: a, sender: f.sender.clone().unwrap_or_default() })? {
                    Answer::Reply { code, text } => {
                        st.callahead = Some((*code, text.clone()));
                        (200..300).contains(code)
                    }
                    Answer::Error(e) => {
                        st.callahead = Some((451, format!("call-ahead failed: {e}")));
                        return Err(Halt::Fail(format!("call-ahead: {e}")));
                    }
                    Answer::Timeout => return Err(Halt::Fail("call-ahead timed out".into())),
                    _ => false,
                }
            }
            Expr::Greylist { delay_ms, expire_ms } => {
                let client = client_network(f.client_ip);
                let sender = f.sender.clone().unwrap_or_default().to_ascii_lowercase();
                let recipient = f
                    .recipient
                    .as_ref()
                    .map(|r| r.address.to_ascii_lowercase())
                    .unwrap_or_else(|| f.recipients.join(","));
                match self.ask(Request::Greylist {
                    client,
                    sender,
                    recipient,
                    delay_ms: *delay_ms,
                    expire_ms: *expire_ms,
                })? {
                    Answer::Bool(b) => *b,
                    Answer::Error(e) => return Err(Halt::Fail(format!("greylist store: {e}"))),
                    // A store that did not answer in time is a failure, never a pass.
                    Answer::Timeout => return Err(Halt::Fail("greylist store timed out".into())),
                    _ => false,
                }
            }
            Expr::LoginMismatch(table) => {
                let Some((user, _)) = &f.auth else {
                    return Ok(false);
                };
                let sender = f.sender.clone().unwrap_or_default();
                if sender.is_empty() {
                    return Ok(false);
                }
                let owners = match self.lookup(prog, *table, &sender.to_ascii_lowercase())? {
                    Some(v) => Some(v),
                    None => {
                        let domain = addr::split(&sender).1;
                        self.lookup(prog, *table, &format!("@{domain}"))?
                    }
                };
                match owners {
                    Some(list) => {
                        !list.split([',', ' ']).filter(|s| !s.is_empty()).any(|o| o.eq_ignore_ascii_case(user))
                    }
                    None => true,
                }
            }
        })
    }

    fn listed(
        &mut self,
        _prog: &Program,
        st: &mut State,
        name: &str,
        zone: &str,
        returns: &[StrId],
    ) -> Result<bool, Halt> {
        let answers = match self.dns(name, RrType::A)? {
            DnsResult::Found(r) => r,
            // A list that cannot be asked lists nobody (Postfix reject_rbl_client does the same).
            DnsResult::None | DnsResult::TempError(_) => return Ok(false),
        };
        let wanted: Vec<&str> = returns.iter().map(|s| _prog.str(*s)).collect();
        let hit = answers.iter().find(|a| a.starts_with("127.") && (wanted.is_empty() || wanted.contains(&a.as_str())));
        let Some(hit) = hit.cloned() else {
            return Ok(false);
        };
        let text = match self.dns(name, RrType::Txt)? {
            DnsResult::Found(r) => r.join(" "),
            _ => String::new(),
        };
        st.dnsbl_hit = Some((zone.to_string(), hit, text));
        Ok(true)
    }

    fn contains(&mut self, prog: &Program, l: &V, set: &SetRef) -> Result<bool, Halt> {
        match set {
            SetRef::Nets(nets) => Ok(match l {
                V::Ip(ip) => nets.iter().any(|n| n.contains(*ip)),
                other => {
                    other.strings().iter().filter_map(|s| s.parse().ok()).any(|ip| nets.iter().any(|n| n.contains(ip)))
                }
            }),
            SetRef::Strings(items) => {
                let items: Vec<&str> = items.iter().map(|s| prog.str(*s)).collect();
                Ok(l.strings().iter().any(|x| items.iter().any(|i| x.eq_ignore_ascii_case(i))))
            }
            SetRef::List(id) => {
                let Some(list) = prog.lists.get(id.index()) else {
                    return Ok(false);
                };
                Ok(match (list.kind, l) {
                    (ListKind::Cidr, V::Ip(ip)) => list.nets.iter().any(|n| n.contains(*ip)),
                    (ListKind::Cidr, other) => other
                        .strings()
                        .iter()
                        .filter_map(|s| s.parse().ok())
                        .any(|ip| list.nets.iter().any(|n| n.contains(ip))),
                    (ListKind::Domains, other) => {
                        other.strings().iter().any(|x| list.items.iter().any(|p| addr::domain_matches(p, x)))
                    }
                    (ListKind::Strings, other) => {
                        other.strings().iter().any(|x| list.items.iter().any(|i| x.eq_ignore_ascii_case(i)))
                    }
                })
            }
            SetRef::Table(t) => {
                for key in l.strings().iter() {
                    if self.lookup(prog, *t, &key.to_ascii_lowercase())?.is_some() {
                        return Ok(true);
                    }
                }
                Ok(false)
            }
        }
    }

    // ---- actions ----------------------------------------------------------------------

    fn reply(&mut self, prog: &Program, f: &Facts, st: &mut State, r: &Reply) -> Result<smtp::Reply, Halt> {
        let text = self.render(prog, f, st, &r.text)?;
        let text = if text.trim().is_empty() { "Rejected".to_string() } else { text };
        Ok(reply_of(r.code, r.enhanced, text))
    }

    fn transport(
        &mut self,
        prog: &Program,
        f: &Facts,
        st: &mut State,
        t: &Transport,
    ) -> Result<RenderedTransport, Halt> {
        let file = matches!(t.kind, TransportKind::Maildir | TransportKind::Mbox)
            || (t.kind == TransportKind::Lmtp
                && t.dest
                    .as_ref()
                    .and_then(|d| d.0.first())
                    .is_some_and(|p| matches!(p, Part::Lit(s) if prog.str(*s).trim_start().starts_with("unix:"))));
        let (dest, root) = match &t.dest {
            Some(d) if file => {
                let (dest, root) = self.render_path(prog, f, st, d)?;
                (Some(dest), root)
            }
            Some(d) => (Some(self.render(prog, f, st, d)?), None),
            None => (None, None),
        };
        Ok(RenderedTransport {
            kind: t.kind,
            dest,
            tls: t.tls,
            auth: t.auth,
            ca: t.ca.map(|c| prog.str(c).to_string()),
            cert: t.cert.map(|(c, k)| (prog.str(c).to_string(), prog.str(k).to_string())),
            root,
        })
    }

    fn act(&mut self, prog: &Program, f: &Facts, st: &mut State, a: &Action) -> Result<Option<Outcome>, Halt> {
        let effect = match a {
            Action::Accept => return Ok(Some(Outcome::Accept)),
            Action::Reject(r) => return Ok(Some(Outcome::Reject(self.reply(prog, f, st, r)?))),
            Action::Tempfail(r) => return Ok(Some(Outcome::Tempfail(self.reply(prog, f, st, r)?))),
            Action::RejectCallahead => {
                let (code, text) = st.callahead.clone().unwrap_or((550, "Recipient rejected by the next hop".into()));
                let (code, text) = if (400..600).contains(&code) {
                    (code, text)
                } else {
                    (550, "Recipient rejected by the next hop".into())
                };
                let class = code / 100;
                let (enh, text) = split_enhanced(&text, class);
                let reply = reply_of(code, enh, text);
                return Ok(Some(if class == 4 { Outcome::Tempfail(reply) } else { Outcome::Reject(reply) }));
            }
            Action::Discard => return Ok(Some(Outcome::Discard)),
            Action::Stop => return Ok(Some(Outcome::Default)),
            Action::Deliver(t) => return Ok(Some(Outcome::Deliver(self.transport(prog, f, st, t)?))),
            Action::Set { var, value } => {
                let v = match value {
                    Some(t) => self.render(prog, f, st, t)?,
                    None => "1".to_string(),
                };
                if let Some(slot) = st.vars.get_mut(var.index()) {
                    *slot = Some(v);
                }
                return Ok(None);
            }
            Action::Unset(var) => {
                if let Some(slot) = st.vars.get_mut(var.index()) {
                    *slot = None;
                }
                return Ok(None);
            }
            Action::Access(table, delay) => return self.access(prog, f, st, *table, *delay),
            Action::Log(t) => Effect::Log(self.render(prog, f, st, t)?),
            Action::GreetPause(ms) => Effect::GreetPause(*ms),
            Action::Tarpit(ms) => Effect::Tarpit(*ms),
            Action::Dsn(d) => Effect::Dsn(*d),
            Action::HeaderAdd { name, value } => {
                Effect::HeaderAdd { name: prog.str(*name).to_string(), value: self.render(prog, f, st, value)? }
            }
            Action::HeaderRemove(name) => Effect::HeaderRemove(prog.str(*name).to_string()),
            Action::HeaderReplace { name, value } => {
                Effect::HeaderReplace { name: prog.str(*name).to_string(), value: self.render(prog, f, st, value)? }
            }
            Action::Hold(reason) => Effect::Hold(match reason {
                Some(t) => self.render(prog, f, st, t)?,
                None => String::new(),
            }),
            Action::Redirect(t) => Effect::Redirect(self.render(prog, f, st, t)?),
            Action::Bcc(t) => Effect::Bcc(self.render(prog, f, st, t)?),
            Action::Archive(t) => Effect::Archive(self.render(prog, f, st, t)?),
            Action::Filter(t) => Effect::Filter(self.transport(prog, f, st, t)?),
            Action::RewriteSender(rw) => {
                let cur = f.sender.clone().unwrap_or_default();
                match self.rewrite(prog, f, st, rw, &cur)? {
                    Some(n) => Effect::RewriteSender(n),
                    None => return Ok(None),
                }
            }
            Action::RewriteRecipient(rw) => {
                let cur = f.recipient.as_ref().map(|r| r.address.clone()).unwrap_or_default();
                match self.rewrite(prog, f, st, rw, &cur)? {
                    Some(n) => Effect::RewriteRecipient(n),
                    None => return Ok(None),
                }
            }
            Action::Masquerade(domains) => {
                Effect::Masquerade(domains.iter().map(|d| prog.str(*d).to_string()).collect())
            }
            Action::Expand(table) => {
                let rcpt = f.recipient.as_ref().map(|r| r.address.to_ascii_lowercase()).unwrap_or_default();
                let (local, domain) = addr::split(&rcpt);
                let found = match self.lookup(prog, *table, &rcpt)? {
                    Some(v) => Some((v, format!("owner-{rcpt}"))),
                    None => self.lookup(prog, *table, local)?.map(|v| (v, format!("owner-{local}"))),
                };
                let Some((members, owner_key)) = found else {
                    return Ok(None);
                };
                let owner = self.lookup(prog, *table, &owner_key)?.map(|_| {
                    let owner_local = owner_key.split('@').next().unwrap_or(&owner_key).to_string();
                    if domain.is_empty() {
                        owner_local
                    } else {
                        format!("{owner_local}@{domain}")
                    }
                });
                let members = members
                    .split(',')
                    .map(str::trim)
                    .filter(|m| !m.is_empty())
                    .map(|m| if m.contains('@') || domain.is_empty() { m.to_string() } else { format!("{m}@{domain}") })
                    .collect();
                Effect::Expand { members, owner }
            }
            Action::ExpandList(id) => {
                Effect::ExpandList(prog.mailing_lists.get(*id as usize).map(|l| l.name.clone()).unwrap_or_default())
            }
            Action::Alert { to, text, every_ms } => Effect::Alert {
                to: self.render(prog, f, st, to)?,
                text: self.render(prog, f, st, text)?,
                every_ms: *every_ms,
            },
            Action::BatvSign => Effect::BatvSign,
        };
        self.effects.push(effect);
        Ok(None)
    }

    fn rewrite(
        &mut self,
        prog: &Program,
        f: &Facts,
        st: &mut State,
        rw: &Rewrite,
        current: &str,
    ) -> Result<Option<String>, Halt> {
        match rw {
            Rewrite::To(t) => Ok(Some(self.render(prog, f, st, t)?)),
            Rewrite::Map(table) => {
                let domain = addr::split(current).1;
                let local = f.local_domains.iter().any(|p| addr::domain_matches(p, &domain));
                for key in mailpolicy_lang::access::rewrite_keys(current, local) {
                    if let Some(v) = self.lookup(prog, *table, &key)? {
                        let v = v.trim().to_string();
                        // `@domain` on the right keeps the local part (canonical maps).
                        if let Some(dom) = v.strip_prefix('@') {
                            let local = addr::split(current).0;
                            return Ok(Some(format!("{local}@{dom}")));
                        }
                        return Ok(Some(v));
                    }
                }
                Ok(None)
            }
        }
    }

    /// The sendmail/Postfix access-table action: look up the stage's keys, most specific
    /// first; the first key found decides.
    fn access(
        &mut self,
        prog: &Program,
        f: &Facts,
        st: &mut State,
        table: TableId,
        delay: AccessDelay,
    ) -> Result<Option<Outcome>, Halt> {
        let (keys, scope) = match self.stage {
            Stage::Connect | Stage::Helo | Stage::Auth => {
                (access::client_keys(f.client_ip, &f.client_name), access::Scope::Connect)
            }
            Stage::Mail => (access::address_keys(f.sender.as_deref().unwrap_or("")), access::Scope::From),
            _ => (
                access::address_keys(f.recipient.as_ref().map(|r| r.address.as_str()).unwrap_or("")),
                access::Scope::To,
            ),
        };
        for key in keys {
            let scoped = format!("{}{key}", scope.prefix());
            let value = match self.lookup(prog, table, &scoped.to_ascii_lowercase())? {
                Some(v) => Some(v),
                None => self.lookup(prog, table, &key)?,
            };
            let Some(value) = value else { continue };
            // A reply written in quotes, as sendmail's access files do: "550 text".
            let value = value.trim();
            let value = match value.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
                Some(inner) => inner,
                None => value,
            };
            let word = value.split_whitespace().next().unwrap_or("").to_ascii_uppercase();
            // sendmail's scopes (R17): a client's RELAY (Connect:, at connect, helo or auth)
            // lets it relay for the session; a recipient's RELAY (To:) accepts that recipient;
            // a sender's RELAY (From:) is only OK, for the envelope sender is forgeable. An OK
            // for a recipient passes the policy but not the built-in relay rule.
            if word == "RELAY" && matches!(self.stage, Stage::Connect | Stage::Helo | Stage::Auth) {
                self.effects.push(Effect::RelayGranted);
            }
            if self.stage == Stage::Rcpt && word != "RELAY" && access::parse_value(value) == AccessAction::Accept {
                return Ok(Some(Outcome::Default));
            }
            let verdict = match access::parse_value(value) {
                // A bare REJECT answers with the stage's default reply.
                AccessAction::Reject { .. } if value.eq_ignore_ascii_case("REJECT") => {
                    let (code, enhanced, text) = mailpolicy_lang::check::default_reply(true, self.stage);
                    Some(Outcome::Reject(reply_of(code, enhanced, text)))
                }
                AccessAction::Accept => Some(Outcome::Accept),
                AccessAction::Dunno => None,
                AccessAction::Discard => Some(Outcome::Discard),
                AccessAction::Reject { code, enhanced, text } => Some(Outcome::Reject(reply_of(code, enhanced, text))),
                AccessAction::Tempfail { code, enhanced, text } => {
                    Some(Outcome::Tempfail(reply_of(code, enhanced, text)))
                }
                AccessAction::Hold(r) => {
                    self.effects.push(Effect::Hold(r));
                    None
                }
                AccessAction::Warn(t) => {
                    self.effects.push(Effect::Log(format!("access warning: {t}")));
                    None
                }
                // sendmail's delay_checks: the recipient's FRIEND / HATER mark, read when a
                // refusal was held for the recipients; the stage goes on.
                AccessAction::Friend | AccessAction::Hater => {
                    if self.stage == Stage::Rcpt {
                        st.rcpt_friend = Some(access::parse_value(value) == AccessAction::Friend);
                    }
                    None
                }
                AccessAction::Invalid(v) => {
                    let name = prog.tables.get(table.index()).map(|t| t.name.clone()).unwrap_or_default();
                    return Err(Halt::Fail(format!("table {name}: value \"{v}\" for {key} is not an access action")));
                }
            };
            // `:delay`: a refusal waits for the recipients instead of ending this stage.
            if let Some(o @ (Outcome::Reject(_) | Outcome::Tempfail(_))) = &verdict {
                if delay != AccessDelay::Now && self.stage != Stage::Rcpt {
                    let loc = self.current.unwrap_or(LocId(0));
                    st.delayed = Some(DelayedRefusal {
                        outcome: o.clone(),
                        mode: delay,
                        loc,
                        transaction: self.stage == Stage::Mail,
                    });
                    self.effects.push(Effect::Log(format!("access: refusal held for the recipients ({key})")));
                    return Ok(None);
                }
            }
            return Ok(verdict);
        }
        Ok(None)
    }
}

enum DnsResult {
    Found(Vec<String>),
    None,
    TempError(String),
}

/// The keys under which the host records a counted event (connection, message,
/// recipient, error), one per fact of `RATE_KEYS` (lang's check module) that has a value.
/// The keys a session is counted under for `concurrent by` from its first moment: the
/// client's address and its network. Both hosts open and close these.
pub fn session_keys(ip: IpAddr) -> Vec<String> {
    vec![format!("client.ip={ip}"), format!("client.network={}", client_network(ip))]
}

pub fn event_keys(f: &Facts) -> Vec<String> {
    let mut keys = session_keys(f.client_ip);
    let mut push = |name: &str, v: &str| {
        if !v.is_empty() {
            keys.push(format!("{name}={}", v.to_ascii_lowercase()));
        }
    };
    push("client.name", &f.client_name);
    if let Some((h, _)) = &f.helo {
        push("helo.name", h);
    }
    if let Some((u, _)) = &f.auth {
        push("auth.user", u);
    }
    if let Some(s) = &f.sender {
        push("sender", s);
        push("sender.domain", &addr::split(s).1);
    }
    if let Some(r) = &f.recipient {
        push("recipient", &r.address);
        push("recipient.domain", &addr::split(&r.address).1);
    }
    keys
}

/// `4.3.2.1` for 1.2.3.4; nibbles for IPv6 (RFC 5782).
pub fn reverse_ip(ip: IpAddr) -> Option<String> {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            Some(format!("{}.{}.{}.{}", o[3], o[2], o[1], o[0]))
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return reverse_ip(IpAddr::V4(v4));
            }
            let mut parts = Vec::with_capacity(32);
            for b in v6.octets().iter().rev() {
                parts.push(format!("{:x}", b & 0xf));
                parts.push(format!("{:x}", b >> 4));
            }
            Some(parts.join("."))
        }
    }
}

/// The `client.network` fact: the client's /24 (IPv4) or /64 (IPv6). Greylisting keys on it,
/// as most greylisting daemons do, so that a sender's pool of outgoing servers passes; rate
/// counters keyed on it give per-network limits (R22).
pub fn client_network(ip: IpAddr) -> String {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    };
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            format!("{}.{}.{}.0/24", o[0], o[1], o[2])
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
        }
    }
}

#[cfg(test)]
mod tests;
