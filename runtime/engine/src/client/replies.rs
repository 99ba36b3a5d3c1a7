//! How [`Client`] reads the server: reply lines assembled into replies, and each reply
//! moving the session on (greeting, EHLO, STARTTLS, AUTH, MAIL, RCPT, DATA or BDAT, RSET,
//! QUIT), with the ways a session fails.

use base64::Engine as _;

use super::*;

impl Client {
    pub(super) fn handle_line(&mut self, raw: &[u8]) {
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        let line = String::from_utf8_lossy(raw);
        let bytes = line.as_bytes();
        let code = match bytes.get(..3) {
            Some(d) if d.iter().all(|b| b.is_ascii_digit()) => {
                std::str::from_utf8(d).ok().and_then(|s| s.parse::<u16>().ok())
            }
            _ => None,
        };
        let Some(code) = code.filter(|c| (200..600).contains(c)) else {
            self.protocol_error("malformed reply line");
            return;
        };
        let sep = bytes.get(3).copied();
        if !matches!(sep, None | Some(b' ') | Some(b'-')) {
            self.protocol_error("malformed reply line");
            return;
        }
        if let Some(c) = self.line_code {
            if c != code {
                self.protocol_error("inconsistent codes in a multi-line reply");
                return;
            }
        }
        self.line_code = Some(code);
        let text = line.get(4..).unwrap_or("").to_string();
        self.lines.push(text);
        if self.lines.len() > MAX_REPLY_LINES {
            self.protocol_error("reply too long");
            return;
        }
        if sep == Some(b'-') {
            return;
        }
        let reply = assemble_reply(code, &self.lines);
        self.lines.clear();
        self.line_code = None;
        self.handle_reply(reply);
    }

    pub(super) fn handle_reply(&mut self, reply: Reply) {
        let Some(e) = self.expect.pop_front() else {
            self.protocol_error("unexpected reply");
            return;
        };
        if e == Expect::Quit {
            self.state = State::Closed;
            return;
        }
        if reply.code == 421 {
            self.fail_closed(e.phase(), reply);
            return;
        }
        let ok = reply.is_positive();
        match e {
            Expect::Greeting => {
                if reply.code == 220 {
                    self.greeting = Some(reply);
                    self.send_hello();
                } else {
                    self.fail_quit(Phase::Greeting, reply);
                }
            }
            Expect::Ehlo | Expect::Lhlo => {
                if reply.code == 250 {
                    self.ext = ServerExtensions::parse(&reply);
                    self.after_hello();
                } else if e == Expect::Ehlo && reply.code >= 500 {
                    self.ext = ServerExtensions::default();
                    let line = format!("HELO {}", self.cfg.helo_name);
                    self.send_cmd(&line, Expect::Helo);
                } else {
                    self.fail_quit(Phase::Helo, reply);
                }
            }
            Expect::Helo => {
                if reply.code == 250 {
                    self.ext = ServerExtensions::default();
                    self.after_hello();
                } else {
                    self.fail_quit(Phase::Helo, reply);
                }
            }
            Expect::StartTls => {
                if reply.code == 220 {
                    self.state = State::AwaitTls;
                    self.events.push_back(ClientEvent::StartTls);
                } else if self.cfg.tls == TlsPolicy::Required {
                    let r = made_up(451, (4, 7, 5), format!("TLS is required, but STARTTLS was refused: {reply}"));
                    self.fail_quit(Phase::StartTls, r);
                } else {
                    self.after_tls();
                }
            }
            Expect::AuthPlain | Expect::AuthPlainResponse => {
                if reply.code == 235 {
                    self.authenticated = true;
                    self.become_ready();
                } else if reply.code == 334 && e == Expect::AuthPlain {
                    let line = self.plain_response();
                    self.send_cmd(&line, Expect::AuthPlainResponse);
                } else {
                    self.auth_failed(reply);
                }
            }
            Expect::AuthLoginUser | Expect::AuthLoginPass => {
                if reply.code == 334 {
                    let cred =
                        self.cfg.auth.clone().unwrap_or(Credentials { user: String::new(), password: String::new() });
                    let (v, next) = if e == Expect::AuthLoginUser {
                        (cred.user, Expect::AuthLoginPass)
                    } else {
                        (cred.password, Expect::AuthFinal)
                    };
                    let line = base64::engine::general_purpose::STANDARD.encode(v.as_bytes());
                    self.send_cmd(&line, next);
                } else {
                    self.auth_failed(reply);
                }
            }
            Expect::AuthFinal => {
                if reply.code == 235 {
                    self.authenticated = true;
                    self.become_ready();
                } else {
                    self.auth_failed(reply);
                }
            }
            Expect::Xforward => {
                if !ok {
                    let r = made_up(451, (4, 3, 0), format!("XFORWARD refused: {reply}"));
                    self.fail_quit(Phase::Mail, r);
                } else if !self.expect.iter().any(|e| *e == Expect::Xforward) {
                    self.become_ready();
                }
            }
            Expect::Mail => self.on_mail(reply, ok),
            Expect::Rcpt(i) => self.on_rcpt(i, reply, ok),
            Expect::Data => self.on_data(reply),
            Expect::DataEnd => {
                if let Some(t) = self.txn.as_mut() {
                    for &i in &t.accepted {
                        if let Some(f) = t.finals.get_mut(i) {
                            *f = Some(reply.clone());
                        }
                    }
                }
                self.finish_txn(false);
            }
            Expect::LmtpDataEnd(i) => {
                if let Some(f) = self.txn.as_mut().and_then(|t| t.finals.get_mut(i)) {
                    *f = Some(reply);
                }
                if !self.expect.iter().any(|e| matches!(e, Expect::LmtpDataEnd(_))) {
                    self.finish_txn(false);
                }
            }
            Expect::JunkDataEnd => self.finish_txn(true),
            Expect::BdatLast => {
                // The chunk's reply is every accepted recipient's final reply; when
                // nothing was accepted (pipelined) it only ends the transaction.
                let mut rset = !ok;
                if let Some(t) = self.txn.as_mut() {
                    rset |= t.accepted.is_empty();
                    for &i in &t.accepted {
                        if let Some(f) = t.finals.get_mut(i) {
                            *f = Some(reply.clone());
                        }
                    }
                }
                self.finish_txn(rset);
            }
            Expect::Rset => {
                if !ok {
                    self.fail_quit(Phase::Rset, reply);
                } else if self.txn.as_ref().is_some_and(|t| t.call_ahead) {
                    self.finish_txn(false);
                } else {
                    self.become_ready();
                }
            }
            Expect::Quit => {}
        }
    }

    pub(super) fn plain_response(&self) -> String {
        let (u, p) = self.cfg.auth.as_ref().map(|c| (c.user.as_str(), c.password.as_str())).unwrap_or(("", ""));
        let mut raw = Vec::new();
        raw.push(0);
        raw.extend_from_slice(u.as_bytes());
        raw.push(0);
        raw.extend_from_slice(p.as_bytes());
        base64::engine::general_purpose::STANDARD.encode(raw)
    }

    pub(super) fn auth_failed(&mut self, reply: Reply) {
        let r = made_up(454, (4, 7, 0), format!("SASL authentication failed; server said: {reply}"));
        self.fail_quit(Phase::Auth, r);
    }

    pub(super) fn after_hello(&mut self) {
        if !self.tls_active && !self.tls_tried && self.cfg.tls != TlsPolicy::None {
            if self.ext.starttls {
                self.tls_tried = true;
                self.send_cmd("STARTTLS", Expect::StartTls);
                return;
            }
            if self.cfg.tls == TlsPolicy::Required {
                let r = made_up(451, (4, 7, 4), "TLS is required, but was not offered by the server");
                self.fail_quit(Phase::StartTls, r);
                return;
            }
        }
        self.after_tls();
    }

    pub(super) fn after_tls(&mut self) {
        if self.cfg.auth.is_some() && !self.authenticated && !self.ext.auth.is_empty() {
            if self.ext.auth.iter().any(|m| m == "PLAIN") {
                let line = format!("AUTH PLAIN {}", self.plain_response());
                self.send_cmd(&line, Expect::AuthPlain);
            } else if self.ext.auth.iter().any(|m| m == "LOGIN") {
                self.send_cmd("AUTH LOGIN", Expect::AuthLoginUser);
            } else {
                let r = made_up(
                    454,
                    (4, 7, 0),
                    format!(
                        "SASL authentication failed: no mechanism in common (server offers {})",
                        self.ext.auth.join(" ")
                    ),
                );
                self.fail_quit(Phase::Auth, r);
            }
            return;
        }
        self.become_ready();
    }

    pub(super) fn become_ready(&mut self) {
        self.state = State::Ready;
        self.txn = None;
        self.events.push_back(ClientEvent::Ready);
    }

    pub(super) fn on_mail(&mut self, reply: Reply, ok: bool) {
        let Some(t) = self.txn.as_mut() else {
            self.protocol_error("unexpected MAIL reply");
            return;
        };
        t.mail = Some(reply.clone());
        if !ok {
            for f in t.finals.iter_mut() {
                *f = Some(reply.clone());
            }
            if !t.pipelined {
                self.finish_txn(true);
            }
            return;
        }
        if !t.pipelined {
            self.send_rcpt(0);
        }
    }

    pub(super) fn on_rcpt(&mut self, i: usize, reply: Reply, ok: bool) {
        let Some(t) = self.txn.as_mut() else {
            self.protocol_error("unexpected RCPT reply");
            return;
        };
        let mail_ok = t.mail.as_ref().is_some_and(|m| m.is_positive());
        if let Some(r) = t.rcpt_replies.get_mut(i) {
            *r = Some(reply.clone());
        }
        if mail_ok {
            if ok {
                t.accepted.push(i);
            } else if let Some(f) = t.finals.get_mut(i) {
                *f = Some(reply);
            }
        }
        if t.pipelined {
            return;
        }
        let next = t.next_rcpt;
        if next < t.recipients.len() {
            self.send_rcpt(next);
        } else if t.call_ahead {
            self.send_cmd("RSET", Expect::Rset);
        } else if t.accepted.is_empty() {
            self.finish_txn(true);
        } else if self.cfg.all_recipients && t.accepted.len() < t.recipients.len() {
            // One recipient refused: no content goes, and every recipient gets the
            // first refusal.
            let refusal = t.finals.iter().flatten().next().cloned();
            if let Some(r) = refusal {
                for f in t.finals.iter_mut() {
                    *f = Some(r.clone());
                }
            }
            self.finish_txn(true);
        } else if t.bdat {
            self.send_bdat();
        } else {
            self.send_cmd("DATA", Expect::Data);
        }
    }

    pub(super) fn on_data(&mut self, reply: Reply) {
        let lmtp = self.cfg.protocol == Protocol::Lmtp;
        let Some(t) = self.txn.as_mut() else {
            self.protocol_error("unexpected DATA reply");
            return;
        };
        if reply.code == 354 {
            if t.accepted.is_empty() {
                // RFC 2920: a 354 although nothing was accepted; end the
                // (empty) message and ignore its result.
                self.out.extend_from_slice(b".\r\n");
                self.expect.push_back(Expect::JunkDataEnd);
                return;
            }
            let data = std::mem::take(&mut t.data);
            t.data_sent = true;
            let accepted = t.accepted.clone();
            self.out.extend_from_slice(&data);
            if lmtp {
                for i in accepted {
                    self.expect.push_back(Expect::LmtpDataEnd(i));
                }
            } else {
                self.expect.push_back(Expect::DataEnd);
            }
            return;
        }
        for &i in &t.accepted {
            if let Some(f) = t.finals.get_mut(i) {
                *f = Some(reply.clone());
            }
        }
        self.finish_txn(true);
    }

    /// Completes the transaction: emits its result, then RSETs or becomes ready.
    pub(super) fn finish_txn(&mut self, rset: bool) {
        let Some(t) = self.txn.take() else {
            self.become_ready();
            return;
        };
        let fallback = made_up(451, (4, 3, 0), "no reply from the server");
        let mail = t.mail.clone().unwrap_or_else(|| fallback.clone());
        if t.call_ahead {
            let rcpt = if mail.is_positive() { t.rcpt_replies.first().cloned().flatten() } else { None };
            self.events.push_back(ClientEvent::CallAhead(CallAheadResult { mail, rcpt }));
        } else {
            let recipients = t.finals.into_iter().map(|f| f.unwrap_or_else(|| fallback.clone())).collect();
            self.events.push_back(ClientEvent::Transaction(TransactionResult {
                mail,
                recipients,
                next_hop_dsn: self.ext.dsn,
            }));
        }
        if rset {
            self.state = State::Busy;
            self.send_cmd("RSET", Expect::Rset);
        } else {
            self.become_ready();
        }
    }

    /// Completes a transaction in flight with `reply` for every recipient
    /// that has no final reply yet.
    pub(super) fn complete_with(&mut self, reply: &Reply) {
        let Some(mut t) = self.txn.take() else { return };
        if t.call_ahead {
            let mail = t.mail.clone().unwrap_or_else(|| reply.clone());
            let rcpt = if mail.is_positive() {
                Some(t.rcpt_replies.first().cloned().flatten().unwrap_or_else(|| reply.clone()))
            } else {
                None
            };
            self.events.push_back(ClientEvent::CallAhead(CallAheadResult { mail, rcpt }));
            return;
        }
        for f in t.finals.iter_mut() {
            if f.is_none() {
                *f = Some(reply.clone());
            }
        }
        let mail = t.mail.take().unwrap_or_else(|| reply.clone());
        self.events.push_back(ClientEvent::Transaction(TransactionResult {
            mail,
            recipients: t.finals.into_iter().flatten().collect(),
            next_hop_dsn: self.ext.dsn,
        }));
    }

    /// Session failure with the connection still usable: QUIT politely.
    pub(super) fn fail_quit(&mut self, phase: Phase, reply: Reply) {
        self.complete_with(&reply);
        self.events.push_back(ClientEvent::Failed(SessionError { phase, reply }));
        self.expect.clear();
        self.send_cmd("QUIT", Expect::Quit);
        self.state = State::Closing;
    }

    /// Session failure with the connection unusable.
    pub(super) fn fail_closed(&mut self, phase: Phase, reply: Reply) {
        if self.state == State::Closing {
            self.state = State::Closed;
            return;
        }
        self.complete_with(&reply);
        self.events.push_back(ClientEvent::Failed(SessionError { phase, reply }));
        self.expect.clear();
        self.state = State::Closed;
    }
}
