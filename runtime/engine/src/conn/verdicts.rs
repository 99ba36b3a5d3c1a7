//! A stage's verdict to the engine's decision: the reply, the transaction's recipients
//! and effects (DSN rewriting, headers, hold, bcc, ...), the message handed over at DATA.

use super::*;

impl Conn {
    pub(super) fn finish_stage(&mut self, stage: Stage, event: Event, mut v: StageVerdict, now: Time) {
        // A milter's refusal, where the policy did not refuse (spec: "Milters").
        if self.milter_verdict(&mut v.outcome) {
            v.decided_by = None;
        }
        // sendmail's delay_checks (R17): a refusal an `access ... :delay` held at connect,
        // helo, auth or mail reaches this recipient now, unless it is a FRIEND (or, with
        // `:delay hater`, unless it is a HATER).
        if stage == Stage::Rcpt && matches!(v.outcome, Outcome::Default | Outcome::Accept | Outcome::Discard) {
            if let Some(d) = self.state.delayed_for_recipient() {
                v.outcome = d.outcome.clone();
                v.decided_by = Some(d.loc);
            }
        }
        // Policy modes (R40).
        if let Outcome::Reject(r) | Outcome::Tempfail(r) = &v.outcome {
            if self.mode.warn_only {
                self.notes.push_back(Need::Note(Note::Log(format!("warn_only: would answer {}", r.line()))));
                v.outcome = Outcome::Default;
            } else if self.mode.soft_bounce {
                if let Outcome::Reject(r) = &v.outcome {
                    v.outcome = Outcome::Tempfail(crate::eval::soft_bounce(r));
                }
            }
        }
        // Built-in relay rule (spec/language.md section 11, R14, B1): a recipient the policy
        // did not explicitly accept is relayed only for local domains, trusted networks or
        // authenticated clients. It applies after the policy modes: `warn_only`
        // softens the policy's own refusals, never the relay rule.
        if stage == Stage::Rcpt && v.outcome == Outcome::Default && !self.relay_allowed() {
            v.outcome = Outcome::Reject(Reply::new(554, (5, 7, 1), "Relay access denied"));
        }
        let outcome_text = match &v.outcome {
            Outcome::Default => "default".to_string(),
            Outcome::Accept => "accept".to_string(),
            Outcome::Reject(r) => format!("reject {}", r.line()),
            Outcome::Tempfail(r) => format!("tempfail {}", r.line()),
            Outcome::Discard => "discard".to_string(),
            Outcome::Deliver(t) => format!("deliver {t}"),
        };
        self.notes.push_back(Need::Note(Note::Verdict {
            stage,
            outcome: outcome_text,
            rule: v.decided_by,
            trace: std::mem::take(&mut v.trace),
        }));
        let mut delay = Duration::ZERO;
        let accepted = matches!(v.outcome, Outcome::Default | Outcome::Accept | Outcome::Discard);
        if stage == Stage::Auth {
            if matches!(event, Event::AuthFailed { .. }) {
                // A failed login stays failed: the policy's effects apply (and a 421 closes),
                // its verdict cannot authenticate. The host counted the failure.
                self.facts.auth_failed = None;
                for e in &v.effects {
                    match e {
                        Effect::Log(_) | Effect::Alert { .. } => self.note_effect(e),
                        Effect::Tarpit(ms) => delay += Duration::from_millis(*ms),
                        _ => {}
                    }
                }
                let mut d = Decision::accept().with_delay(delay);
                if let Outcome::Reject(r) | Outcome::Tempfail(r) = &v.outcome {
                    if r.code == 421 {
                        d = Decision::reject(ascii_reply(r)).with_close();
                    }
                }
                self.defer(d, now);
                return;
            }
            if !accepted {
                // A login the policy refuses leaves the session exactly as unauthenticated as
                // a wrong password does, and counts as a failed AUTH.
                self.facts.auth = None;
                let keys = crate::eval::event_keys(&self.facts);
                self.notes
                    .push_back(Need::Note(Note::Count { counter: mailpolicy_lang::ir::Counter::AuthFailures, keys }));
            }
        }
        for e in &v.effects {
            match e {
                Effect::Log(_) | Effect::Alert { .. } => self.note_effect(e),
                Effect::Tarpit(ms) => delay += Duration::from_millis(*ms),
                Effect::GreetPause(ms) => delay = delay.max(Duration::from_millis(*ms)),
                // Only a client (Connect:) RELAY opens the relay rule for the session; a
                // To: RELAY accepts its recipient (sendmail's scopes, R17).
                Effect::RelayGranted => {
                    if matches!(stage, Stage::Connect | Stage::Helo | Stage::Auth) {
                        self.relay_session = true;
                    }
                }
                _ => {}
            }
        }
        if !accepted {
            let r = match &v.outcome {
                Outcome::Reject(r) | Outcome::Tempfail(r) => r.clone(),
                _ => Reply::new(550, (5, 7, 1), "Rejected"),
            };
            let close = r.code == 421 || r.code == 521;
            let mut d = Decision::reject(ascii_reply(&r)).with_delay(delay);
            if close {
                d = d.with_close();
            }
            if stage == Stage::Data {
                self.end_transaction();
            }
            self.defer(d, now);
            return;
        }
        let discard = v.outcome == Outcome::Discard;
        match stage {
            Stage::Connect | Stage::Helo | Stage::Auth => {
                if discard {
                    self.discard_session = true;
                }
                for e in &v.effects {
                    if let Effect::Hold(r) = e {
                        self.session_hold = Some(r.clone());
                    }
                }
                self.defer(Decision::accept().with_delay(delay), now);
            }
            Stage::Mail => {
                self.tx.discard = discard;
                self.apply_tx_effects(&v.effects);
                self.defer(Decision::accept().with_delay(delay), now);
            }
            Stage::Rcpt => {
                let mut rec = TxRcpt { rcpt: self.rcpt_record(), discard };
                for e in &v.effects {
                    match e {
                        Effect::Dsn(DsnAction::NotifyNever) => rec.rcpt.notify = vec!["NEVER".into()],
                        Effect::Dsn(DsnAction::DenySuccess) => {
                            let had = !rec.rcpt.notify.is_empty();
                            rec.rcpt.notify.retain(|n| n != "SUCCESS");
                            if had && rec.rcpt.notify.is_empty() {
                                rec.rcpt.notify.push("NEVER".into());
                            }
                        }
                        Effect::RewriteRecipient(a) | Effect::Redirect(a) => rec.rcpt.address = a.clone(),
                        _ => {}
                    }
                }
                self.apply_tx_effects(&v.effects);
                self.tx.rcpts.push(rec);
                self.facts.recipients = self.accepted_addresses();
                self.defer(Decision::accept().with_delay(delay), now);
            }
            Stage::Data => {
                self.apply_tx_effects(&v.effects);
                self.apply_milter_mods();
                let Event::Message { data, envelope, spilled, .. } = event else {
                    self.defer(Decision::accept(), now);
                    return;
                };
                let live: Vec<QueuedRcpt> = if let Some(to) = &self.tx.redirect {
                    vec![QueuedRcpt {
                        address: to.clone(),
                        notify: Vec::new(),
                        orcpt: String::new(),
                        ..Default::default()
                    }]
                } else {
                    self.tx.rcpts.iter().filter(|r| !r.discard).map(|r| r.rcpt.clone()).collect()
                };
                let mut recipients = live;
                for b in &self.tx.bcc {
                    recipients.push(QueuedRcpt {
                        address: b.clone(),
                        notify: vec!["NEVER".into()],
                        orcpt: String::new(),
                        ..Default::default()
                    });
                }
                if discard || self.tx.discard || self.discard_session || recipients.is_empty() {
                    self.notes.push_back(Need::Note(Note::Log("message discarded by policy".into())));
                    self.end_transaction();
                    self.defer(
                        Decision::accept()
                            .with_reply(Reply::new(250, (2, 0, 0), "Ok: message accepted"))
                            .with_delay(delay),
                        now,
                    );
                    return;
                }
                let sender =
                    self.tx.sender_rewrite.clone().unwrap_or_else(|| self.facts.sender.clone().unwrap_or_default());
                let (mut data, added) = self.edit_message(&data);
                let mut spilled = spilled;
                if let Some(body) = self.tx.body.take() {
                    // A milter's new body replaces everything after the header section,
                    // the part the host spilled included.
                    let end = crate::headers::header_end(&data);
                    let eol = crate::headers::line_ending(&data);
                    data.truncate(end);
                    data.extend_from_slice(eol.as_bytes());
                    data.extend_from_slice(&body);
                    spilled = 0;
                }
                let mut msg = QueuedMessage {
                    sender,
                    recipients,
                    ret: if self.tx.ret_headers {
                        "HDRS".into()
                    } else {
                        envelope.params.ret.map(|r| format!("{r:?}").to_ascii_uppercase()).unwrap_or_default()
                    },
                    envid: envelope.params.envid.clone().unwrap_or_default(),
                    data,
                    hold: self.tx.hold.clone().or_else(|| self.session_hold.clone()),
                    archive: self.tx.archive.clone(),
                    filter: self.tx.filter.clone(),
                    batv_sign: self.tx.batv_sign,
                    client_ip: self.facts.client_ip.to_string(),
                    helo: self.facts.helo.as_ref().map(|h| h.0.clone()).unwrap_or_default(),
                    auth_user: self.facts.auth.as_ref().map(|a| a.0.clone()).unwrap_or_default(),
                    added_headers: added,
                    session: self.session_record(),
                    copy: false,
                    list: None,
                    tail: spilled,
                };
                // B7: Authentication-Results for what the policy checked, then our DKIM
                // signature (asked of the host) on top, on mail our own users send.
                if let Some(field) = self.sender_auth.header(&self.session.config().hostname, &self.facts) {
                    msg.data = prepend_field(&field, &msg.data);
                }
                let ours = self.facts.auth.is_some() || self.trusted_client();
                if let Some(domain) = sender_auth::signing_domain(&self.prog, &msg.sender).filter(|_| ours) {
                    let sender = msg.sender.clone();
                    self.pending = HostWait::Seal(Box::new(msg), delay);
                    self.notes.push_back(Need::Sign(Sign { domain, sender }));
                    return;
                }
                self.hand_over(msg, delay);
                // The reply waits for `queued` (or `proxied`), and then for a tarpit's delay.
            }
            _ => {}
        }
    }

    /// A stage's decision is applied after its verdict note has been handed to the host,
    /// so the host sees the verdict before the reply it produced.
    /// A `log` or `alert` effect, handed to the host as a note (other effects: nothing).
    fn note_effect(&mut self, e: &Effect) {
        let note = match e {
            Effect::Log(t) => Note::Log(t.clone()),
            Effect::Alert { to, text, every_ms } => {
                Note::Alert { to: to.clone(), text: text.clone(), every_ms: *every_ms }
            }
            _ => return,
        };
        self.notes.push_back(Need::Note(note));
    }

    pub(super) fn defer(&mut self, d: Decision, _now: Time) {
        self.deferred = Some(d);
    }

    pub(super) fn apply_tx_effects(&mut self, effects: &[Effect]) {
        for e in effects {
            match e {
                Effect::Hold(r) => self.tx.hold = Some(r.clone()),
                Effect::HeaderAdd { .. }
                | Effect::HeaderRemove(_)
                | Effect::HeaderReplace { .. }
                | Effect::HeaderAppend { .. }
                | Effect::HeaderInsert { .. }
                | Effect::HeaderChange { .. } => self.tx.headers.push(e.clone()),
                Effect::Archive(a) => self.tx.archive.push(a.clone()),
                Effect::Bcc(b) => self.tx.bcc.push(b.clone()),
                Effect::Redirect(r) if self.facts.recipient.is_none() => self.tx.redirect = Some(r.clone()),
                Effect::Filter(t) => self.tx.filter = Some(t.clone()),
                Effect::BatvSign => self.tx.batv_sign = true,
                Effect::RewriteSender(s) => self.tx.sender_rewrite = Some(s.clone()),
                Effect::Dsn(DsnAction::RetHeaders) => self.tx.ret_headers = true,
                _ => {}
            }
        }
    }
}
