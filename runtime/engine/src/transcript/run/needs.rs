//! The connection's [`Need`]s answered as the daemon would, from the case's fixtures:
//! the pump that drives [`Conn`], milters, sender authentication, DKIM signing, SASL
//! steps, notes (verdict traces, logs, alerts, counts, logins), and the queue-side
//! stages of a queued message.

use super::*;

impl CaseRun {
    pub(super) fn pump(&mut self) {
        for _ in 0..100_000 {
            self.drain();
            let now = Time(self.now);
            let Some(need) = self.conn.as_mut().and_then(|c| c.poll_need(now)) else {
                break;
            };
            match need {
                Need::Policy(req) => {
                    let prog = self.prog.clone();
                    let ans = self.answer(&prog, &req);
                    self.log.push(format!("  lookup {} -> {ans}", req.describe(&prog)));
                    if let Some(c) = self.conn.as_mut() {
                        c.answer(req, ans);
                    }
                }
                Need::AuthStep { mechanism, data } => self.sasl_step(&mechanism, data),
                Need::FailedLogins { key, window_ms } => {
                    let n =
                        self.rates.count(mailpolicy_lang::ir::Counter::AuthFailures.name(), &key, window_ms, self.now);
                    self.log.push(format!("  failed logins by {key} -> {n}"));
                    if let Some(c) = self.conn.as_mut() {
                        c.failed_logins(n, now);
                    }
                }
                Need::LoginKnown { login, ip, window_ms } => {
                    let t = self.now;
                    let known = self
                        .logins
                        .get(&login)
                        .is_some_and(|v| v.iter().any(|(a, at)| *a == ip && t.saturating_sub(*at) <= window_ms));
                    self.log.push(format!("  login {login} known from {ip} -> {known}"));
                    if let Some(c) = self.conn.as_mut() {
                        c.login_known(known, now);
                    }
                }
                Need::SenderAuth(q) => {
                    let report = self.sender_auth(&q);
                    self.log.push(format!("  {:?} check -> {report:?}", q.kind));
                    if let Some(c) = self.conn.as_mut() {
                        c.sender_auth_checked(report);
                    }
                }
                Need::StartTls => {
                    let info = self.tls_info();
                    if let Some(c) = self.conn.as_mut() {
                        c.tls_established(info, now);
                    }
                }
                Need::Sign(sign) => {
                    let field = self.sign(&sign);
                    if let Some(c) = self.conn.as_mut() {
                        c.signed(field.as_deref());
                    }
                }
                Need::Queue(mut msg) => {
                    if msg.tail > 0 {
                        msg.data.extend_from_slice(&std::mem::take(&mut self.spill).1);
                        msg.tail = 0;
                    }
                    self.queued.push(msg);
                    let id = format!("{:010X}", self.queued.len());
                    if let Some(c) = self.conn.as_mut() {
                        c.queued(&id, now);
                        c.set_next_queue_id(format!("{:010X}", self.queued.len() + 1));
                    }
                }
                Need::ProxyFilter(mut call) => {
                    if call.message.tail > 0 {
                        call.message.data.extend_from_slice(&std::mem::take(&mut self.spill).1);
                        call.message.tail = 0;
                    }
                    let answer = match self.proxy_answers.len() {
                        0 => None,
                        1 => self.proxy_answers.front().cloned(),
                        _ => self.proxy_answers.pop_front(),
                    };
                    let answer = answer.unwrap_or_else(|| {
                        self.fail(format!(
                            "a message went to the proxy filter {} and the case gives no `proxy-filter:` answer",
                            call.address
                        ));
                        crate::before_queue::FilterOutcome::Failed("no `proxy-filter:` answer".into())
                    });
                    self.proxied.push(call.message);
                    if let Some(c) = self.conn.as_mut() {
                        c.proxied(&answer, now);
                    }
                }
                Need::Milter(call) => {
                    let answers = self.milter_answers(&call);
                    if let Some(c) = self.conn.as_mut() {
                        c.milter_replied(answers, now);
                    }
                }
                Need::Note(n) => self.note(n),
            }
        }
        self.drain();
    }

    /// The milters' answers to a stage from the case's `milter NAME:` lines (a milter
    /// with no line for the stage continues), consulted in order as the daemon does.
    fn milter_answers(&mut self, call: &crate::conn::MilterCall) -> Vec<(String, crate::conn::MilterAnswer)> {
        use super::super::MilterFixture as F;
        let rcpt = match &call.step {
            crate::milter::Step::Rcpt(a) => a.first().map(|a| a.trim_matches(['<', '>']).to_ascii_lowercase()),
            _ => None,
        };
        let names: Vec<String> =
            self.prog.scanners.iter().filter(|s| s.kind == "milter").map(|s| s.name.clone()).collect();
        let mut out = Vec::new();
        for name in names {
            let mut outcome = crate::milter::MilterReply::default();
            let mut error = None;
            for (m, stage, r, answer) in &self.milters {
                if *m != name || stage != call.stage.name() || r.as_ref().is_some_and(|r| Some(r) != rcpt.as_ref()) {
                    continue;
                }
                match answer {
                    F::Verdict(v) => outcome.verdict = v.clone(),
                    F::Modification(x) => outcome.modifications.push(x.clone()),
                    F::Error(e) => error = Some(e.clone()),
                }
            }
            let answer = match error {
                Some(e) => Err(e),
                None => Ok(outcome),
            };
            let stop = self.conn.as_ref().is_some_and(|c| c.milter_stops(&name, &answer));
            out.push((name, answer));
            if stop {
                break;
            }
        }
        out
    }

    /// SPF, DKIM and DMARC from the case's `auth` fixtures (`none` for a check without
    /// one): one DKIM signature with the `dkim` result unless it is `none`, the DMARC
    /// result for the domain of the message's From.
    fn sender_auth(&self, q: &crate::conn::AuthQuery) -> crate::conn::AuthReport {
        use crate::conn::{AuthKind, AuthReport, ContentReport, MethodReport};
        let fixture = |k: &str| self.auth_results.get(k).cloned().unwrap_or_else(|| "none".into());
        match q.kind {
            AuthKind::Spf => AuthReport::Spf(fixture("spf")),
            AuthKind::Content => {
                let dkim = fixture("dkim");
                let from = self
                    .conn
                    .as_ref()
                    .and_then(|c| c.facts().message.as_ref())
                    .and_then(|m| m.header("from").first().cloned())
                    .unwrap_or_default();
                let domain = from.rsplit_once('@').map(|(_, d)| d.trim_end_matches(['>', ' ']).to_string());
                let mut dmarc = MethodReport::word(&fixture("dmarc"));
                dmarc.props.extend(domain.map(|d| ("header.from".to_string(), d)));
                AuthReport::Content(ContentReport {
                    dkim: if dkim == "none" { Vec::new() } else { vec![MethodReport::word(&dkim)] },
                    dmarc,
                    dmarc_policy: self.auth_results.get("dmarc-policy").cloned().unwrap_or_default(),
                })
            }
        }
    }

    /// The DKIM signature the daemon would add (B7), made with the `dkim_key` secret
    /// fixture by the host's signer.
    fn sign(&mut self, sign: &crate::conn::Sign) -> Option<String> {
        let Some(dkim) = self.dkim else {
            self.fail("the policy signs with DKIM and this host of the engine has no DKIM signer (mailc test has one)");
            return None;
        };
        // The whole message: the part in memory and what was spilled after it.
        let mut signed = Vec::new();
        if let Some((head, tail)) = self.conn.as_ref().and_then(|c| c.sealing_message()) {
            signed.extend_from_slice(head);
            if tail > 0 {
                signed.extend_from_slice(&self.spill.1);
            }
        }
        let secrets = self.secrets.clone();
        match dkim(&self.prog, &|n| secrets.get(n).cloned(), &signed, &sign.domain) {
            Ok(h) => Some(h),
            Err(DkimError::Sign(e)) => {
                self.fail(format!("DKIM signing failed: {e}"));
                None
            }
            Err(DkimError::Key(e)) => {
                self.fail(format!(
                    "the policy signs with DKIM and the case has no usable key: {e} (give it as `secret NAME: PEM`, `\\n` for newlines)"
                ));
                None
            }
        }
    }

    fn note(&mut self, n: Note) {
        match n {
            Note::Verdict { stage, outcome, rule, trace } => {
                self.verdict_traces.push(VerdictTrace { stage, outcome: outcome.clone(), rule, trace });
                let at = rule.map(|r| self.prog.describe_loc(r)).unwrap_or_else(|| "end of stage".into());
                self.log.push(format!("  {}: {outcome} ({at})", stage.name()));
                self.verdicts.push_back(rule);
            }
            Note::Log(l) => self.logs.push(l),
            Note::Alert { to, text, every_ms } => {
                // An alert mail goes out at most once per `:every` for the same address and
                // text, on the virtual clock, as the daemon sends them.
                let key = (to.to_ascii_lowercase(), text.clone());
                if !self.alerts_sent.get(&key).is_some_and(|t| self.now.saturating_sub(*t) < every_ms) {
                    self.alerts_sent.insert(key, self.now);
                    self.alert_mails.push(format!("{to}: {text}"));
                }
                self.alerts.push(format!("{to}: {text}"));
            }
            Note::Count { counter, keys } => {
                for k in keys {
                    self.rates.record(counter.name(), &k, self.now);
                }
            }
            Note::Login { mechanism, login, ok, throttled } => {
                let who = login.clone().unwrap_or_default();
                let how = match (ok, throttled) {
                    (true, _) => "authenticated".to_string(),
                    (false, "") => "failed".to_string(),
                    (false, t) => format!("refused ({t} throttle)"),
                };
                self.log.push(format!("  auth {mechanism} {who}: {how}"));
                if let (true, Some(l)) = (ok, login) {
                    let v = self.logins.entry(l).or_default();
                    v.retain(|(a, _)| *a != self.client.ip());
                    v.push((self.client.ip(), self.now));
                }
            }
        }
    }

    fn sasl_step(&mut self, mechanism: &str, data: Option<Vec<u8>>) {
        let now = Time(self.now);
        let check = |creds: &[(String, String)], u: &str, p: &str| creds.iter().any(|(cu, cp)| cu == u && cp == p);
        let outcome = match (mechanism, &self.sasl, data) {
            ("PLAIN", _, None) => {
                if let Some(c) = self.conn.as_mut() {
                    c.auth_continue(b"", now);
                }
                return;
            }
            ("PLAIN", _, Some(d)) => {
                let parts: Vec<&[u8]> = d.split(|b| *b == 0).collect();
                match parts.as_slice() {
                    [_authz, user, pass] => {
                        let (u, p) =
                            (String::from_utf8_lossy(user).to_string(), String::from_utf8_lossy(pass).to_string());
                        if check(&self.credentials, &u, &p) {
                            SaslResult::Success { user: u }
                        } else {
                            SaslResult::Failure { login: Some(u) }
                        }
                    }
                    _ => SaslResult::Failure { login: None },
                }
            }
            ("LOGIN", Sasl::None, None) => {
                self.sasl = Sasl::LoginWantUser;
                if let Some(c) = self.conn.as_mut() {
                    c.auth_continue(b"Username:", now);
                }
                return;
            }
            ("LOGIN", Sasl::None | Sasl::LoginWantUser, Some(u)) => {
                self.sasl = Sasl::LoginWantPass(String::from_utf8_lossy(&u).to_string());
                if let Some(c) = self.conn.as_mut() {
                    c.auth_continue(b"Password:", now);
                }
                return;
            }
            ("LOGIN", Sasl::LoginWantPass(u), Some(p)) => {
                let u = u.clone();
                if check(&self.credentials, &u, &String::from_utf8_lossy(&p)) {
                    SaslResult::Success { user: u }
                } else {
                    SaslResult::Failure { login: Some(u) }
                }
            }
            _ => SaslResult::Failure { login: None },
        };
        self.sasl = Sasl::None;
        if let Some(c) = self.conn.as_mut() {
            c.sasl_done(mechanism, outcome, now);
        }
    }

    /// Run a queue-side stage for `address` of the last queued message (route), or for a
    /// DSN to `address` (bounce), and describe the outcome.
    pub(super) fn queue_stage(&mut self, stage: Stage, address: &str, kind: &str) -> Option<String> {
        let prog = self.prog.clone();
        // The facts as the daemon's queue manager builds them (`record::stage_facts`).
        let queue_id = format!("{:010X}", self.queued.len());
        let at = InQueue { queue_id: &queue_id, now_ms: self.now, arrived_ms: self.now };
        let (facts, state) = match stage {
            Stage::Route => {
                let m = self.last_msg()?;
                let Some(r) = m.recipients.iter().find(|r| r.address.eq_ignore_ascii_case(address)).cloned() else {
                    self.fail(format!("{address} is not a recipient of the queued message"));
                    return None;
                };
                stage_facts(&prog, &m, QueueStage::Route(&r), at)
            }
            _ => {
                // A DSN about the last message queued; with none, about a message of this
                // session so far (`bounce:` needs no queued message).
                self.pump();
                let m = match self.queued.last() {
                    Some(m) => m.clone(),
                    None => QueuedMessage {
                        client_ip: self.client.ip().to_string(),
                        session: self.conn.as_ref().map(|c| c.session_record()).unwrap_or_default(),
                        ..QueuedMessage::default()
                    },
                };
                stage_facts(&prog, &m, QueueStage::Bounce { to: address, kind, reason: "test" }, at)
            }
        };
        let mut state = state;
        if stage == Stage::Route {
            // As the queue manager routes: rewritten recipients anew, soft_bounce applied.
            let mut run = crate::routing::RouteRun::new(&prog, facts, state);
            for _ in 0..10_000 {
                match run.step(&prog) {
                    Step::Need(req) => {
                        let a = self.answer(&prog, &req);
                        run.answer(req, a);
                    }
                    Step::Done(v) => return Some(describe(stage, &v)),
                }
            }
            self.fail("the stage did not finish");
            return None;
        }
        let mut run = Run::new(&prog, stage);
        for _ in 0..10_000 {
            match run.step(&prog, &facts, &mut state) {
                Step::Need(req) => {
                    let a = self.answer(&prog, &req);
                    run.answer(req, a);
                }
                Step::Done(v) => return Some(describe(stage, &v)),
            }
        }
        self.fail("the stage did not finish");
        None
    }
}
