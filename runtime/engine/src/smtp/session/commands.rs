//! The command handlers of [`Session`]: EHLO and its reply, MAIL, RCPT, DATA and BDAT
//! (with the end of a message), AUTH, and the rest of the command set, one line at a time.

use std::time::Duration;

use base64::Engine as _;

use super::*;

impl Session {
    pub(super) fn offered(&self) -> Offered {
        let e = &self.config.extensions;
        if !matches!(self.helo, Some((_, true))) {
            return Offered::default();
        }
        Offered {
            size: e.size,
            eight_bit: e.eight_bit_mime,
            binary: e.binary_mime && e.chunking,
            smtputf8: e.smtputf8,
            dsn: e.dsn,
            auth: self.auth_offered(),
        }
    }

    pub(super) fn auth_offered(&self) -> bool {
        !self.config.auth_mechanisms.is_empty() && (self.tls.is_some() || !self.config.auth_requires_tls)
    }

    pub(super) fn ehlo_reply(&self, first: String) -> Reply {
        let e = &self.config.extensions;
        let mut lines = vec![first];
        if e.pipelining {
            lines.push("PIPELINING".into());
        }
        if e.size {
            if self.config.max_message_size > 0 {
                lines.push(format!("SIZE {}", self.config.max_message_size));
            } else {
                lines.push("SIZE".into());
            }
        }
        if e.eight_bit_mime {
            lines.push("8BITMIME".into());
        }
        if e.smtputf8 {
            lines.push("SMTPUTF8".into());
        }
        if e.enhanced_status_codes {
            lines.push("ENHANCEDSTATUSCODES".into());
        }
        if e.dsn {
            lines.push("DSN".into());
        }
        if e.chunking {
            lines.push("CHUNKING".into());
            if e.binary_mime {
                lines.push("BINARYMIME".into());
            }
        }
        if e.starttls && self.config.tls_available && self.tls.is_none() {
            lines.push("STARTTLS".into());
        }
        if self.auth_offered() {
            lines.push(format!("AUTH {}", self.config.auth_mechanisms.join(" ")));
        }
        Reply::plain(250, lines.join("\n"))
    }

    pub(super) fn finish_chunk(&mut self, last: bool, sink: BdatSink, now: Time) {
        match sink {
            BdatSink::Discard { reply, delay, close } => self.send(reply, delay, close, now),
            BdatSink::Store => {
                let checker = self.tx.as_mut().and_then(|t| t.bdat.take());
                let Some(checker) = checker else {
                    self.send(r(503, (5, 5, 1), "Need MAIL command"), Duration::ZERO, false, now);
                    return;
                };
                if last {
                    self.finish_message(checker, true, now);
                } else if checker.flags.too_big {
                    self.reset_tx();
                    self.send(
                        r(552, (5, 3, 4), "Message size exceeds fixed maximum message size"),
                        Duration::ZERO,
                        false,
                        now,
                    );
                } else {
                    let size = checker.size();
                    if let Some(tx) = self.tx.as_mut() {
                        tx.bdat = Some(checker);
                    }
                    self.send(r(250, (2, 0, 0), &format!("{size} octets received")), Duration::ZERO, false, now);
                }
            }
        }
    }

    pub(super) fn finish_message(&mut self, checker: ContentChecker, chunked: bool, now: Time) {
        let (data, flags, spill, spilled) = checker.finish_spilling();
        self.spill_out.extend_from_slice(&spill);
        let Some(tx) = self.tx.take() else {
            self.send(r(503, (5, 5, 1), "Need MAIL command"), Duration::ZERO, false, now);
            return;
        };
        let binary = tx.params.body == BodyType::BinaryMime;
        // Long text lines are accepted (RFC 5322's 998 is a limit on what senders generate, and
        // Postfix accepts them too); the SMTP client folds them on the way out.
        let ContentFlags { too_big, bare_newline, long_line: _, header_too_big } = flags;
        let err = if too_big {
            Some(r(552, (5, 3, 4), "Message size exceeds fixed maximum message size"))
        } else if bare_newline && !binary {
            Some(r(550, (5, 5, 2), "Message contains bare CR or LF; lines must end with CRLF"))
        } else if header_too_big {
            Some(r(552, (5, 3, 4), "Message header size exceeds limit"))
        } else {
            None
        };
        if let Some(e) = err {
            self.send(e, Duration::ZERO, false, now);
            return;
        }
        self.pending = Some(Awaiting::Message);
        self.events.push_back(Event::Message {
            envelope: Envelope { from: tx.from, params: tx.params, recipients: tx.recipients },
            data,
            chunked,
            spilled,
        });
    }

    pub(super) fn process_line(&mut self, line: Vec<u8>, now: Time) {
        let err = |s: &mut Session, reply: Reply| s.send(reply, Duration::ZERO, false, now);
        let body = line.strip_suffix(b"\n").unwrap_or(&line);
        let Some(body) = body.strip_suffix(b"\r") else {
            if let Receiving::AuthResponse { .. } = self.phase {
                self.phase = Receiving::Command;
                self.events.push_back(Event::AuthCancelled);
            }
            return err(self, r(500, (5, 5, 2), "Bare LF received; lines must end with CRLF"));
        };
        let text = match std::str::from_utf8(body) {
            Ok(t) if !t.chars().any(|c| c.is_control() && c != '\t') => t.to_string(),
            _ => {
                if let Receiving::AuthResponse { .. } = self.phase {
                    self.phase = Receiving::Command;
                    self.events.push_back(Event::AuthCancelled);
                }
                return err(self, r(500, (5, 5, 2), "Invalid characters in command"));
            }
        };
        if let Receiving::AuthResponse { mechanism } = &self.phase {
            let mechanism = mechanism.clone();
            self.phase = Receiving::Command;
            return self.auth_response(mechanism, &text, now);
        }
        let (verb, args) = match text.split_once(' ') {
            Some((v, a)) => (v, a),
            None => (text.as_str(), ""),
        };
        let verb = verb.to_ascii_uppercase();
        if self.rejected_at_connect && verb != "QUIT" {
            return err(self, r(503, (5, 5, 1), "Bad sequence of commands"));
        }
        let no_args = args.trim().is_empty();
        match verb.as_str() {
            "HELO" | "EHLO" => {
                let name = args.trim();
                if name.is_empty() || name.contains([' ', '\t']) {
                    return err(self, r(501, (5, 5, 4), &format!("Syntax: {verb} hostname")));
                }
                self.reset_tx();
                self.helo = None;
                self.wait(
                    Awaiting::Helo { name: name.to_string(), extended: verb == "EHLO" },
                    Event::Helo { name: name.to_string(), extended: verb == "EHLO" },
                );
            }
            "MAIL" => self.cmd_mail(args, now),
            "RCPT" => self.cmd_rcpt(args, now),
            "DATA" => {
                if !no_args {
                    err(self, r(501, (5, 5, 4), "Syntax: DATA"))
                } else if let Some(e) = self.data_precheck() {
                    err(self, e)
                } else if self.tx.as_ref().is_some_and(|t| t.bdat.is_some()) {
                    err(self, r(503, (5, 5, 1), "DATA not allowed after BDAT"))
                } else if self.tx.as_ref().is_some_and(|t| t.params.body == BodyType::BinaryMime) {
                    err(self, r(503, (5, 5, 1), "BODY=BINARYMIME requires BDAT"))
                } else {
                    self.wait(Awaiting::Data { bdat: None }, Event::Data { chunked: false });
                }
            }
            "BDAT" => self.cmd_bdat(args, now),
            "RSET" => {
                if !no_args {
                    return err(self, r(501, (5, 5, 4), "Syntax: RSET"));
                }
                self.reset_tx();
                self.send(r(250, (2, 0, 0), "OK"), Duration::ZERO, false, now);
            }
            "NOOP" => self.send(r(250, (2, 0, 0), "OK"), Duration::ZERO, false, now),
            "QUIT" => {
                if !no_args {
                    return err(self, r(501, (5, 5, 4), "Syntax: QUIT"));
                }
                self.events.push_back(Event::Quit);
                let bye = format!("{} closing connection", self.config.hostname);
                self.send(r(221, (2, 0, 0), &bye), Duration::ZERO, true, now);
            }
            "VRFY" | "EXPN" => {
                if no_args {
                    return err(self, r(501, (5, 5, 4), &format!("Syntax: {verb} address")));
                }
                let arg = args.trim().to_string();
                if verb == "VRFY" {
                    if self.config.vrfy_enabled {
                        self.wait(Awaiting::Vrfy, Event::Vrfy { arg });
                    } else {
                        self.send(
                            r(252, (2, 5, 2), "Cannot VRFY user, but will accept message and attempt delivery"),
                            Duration::ZERO,
                            false,
                            now,
                        );
                    }
                } else if self.config.expn_enabled {
                    self.wait(Awaiting::Expn, Event::Expn { arg });
                } else {
                    err(self, r(502, (5, 5, 1), "EXPN not available"));
                }
            }
            "HELP" => self.send(
                r(214, (2, 0, 0), "Commands: HELO EHLO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP STARTTLS AUTH"),
                Duration::ZERO,
                false,
                now,
            ),
            "STARTTLS" => {
                if !no_args {
                    err(self, r(501, (5, 5, 4), "Syntax: STARTTLS"))
                } else if self.tls.is_some() {
                    err(self, r(503, (5, 5, 1), "TLS already active"))
                } else if !(self.config.tls_available && self.config.extensions.starttls) {
                    err(self, r(502, (5, 5, 1), "STARTTLS not available"))
                } else if self.tx.is_some() {
                    err(self, r(503, (5, 5, 1), "MAIL transaction in progress"))
                } else {
                    self.out.extend_from_slice(
                        &r(220, (2, 0, 0), "Ready to start TLS").to_wire(self.config.extensions.enhanced_status_codes),
                    );
                    // CVE-2011-0411: nothing received before the handshake may
                    // be interpreted after it.
                    self.input.clear();
                    self.discarding_line = false;
                    self.phase = Receiving::WaitTls;
                    self.events.push_back(Event::StartTls);
                }
            }
            "AUTH" => self.cmd_auth(args, now),
            "GET" | "POST" | "HEAD" | "PUT" | "CONNECT" | "USER" => {
                self.send(r(521, (5, 5, 1), "Protocol error"), Duration::ZERO, true, now)
            }
            "TURN" | "ETRN" | "ATRN" | "SEND" | "SOML" | "SAML" => {
                err(self, r(502, (5, 5, 1), "Command not implemented"))
            }
            _ => err(self, r(500, (5, 5, 2), "Command unrecognized")),
        }
    }

    pub(super) fn wait(&mut self, p: Awaiting, e: Event) {
        self.pending = Some(p);
        self.events.push_back(e);
    }

    pub(super) fn data_precheck(&self) -> Option<Reply> {
        match &self.tx {
            None => Some(r(503, (5, 5, 1), "Need MAIL command")),
            Some(t) if t.recipients.is_empty() => Some(r(554, (5, 5, 1), "No valid recipients")),
            Some(_) => None,
        }
    }

    /// Splits `FROM:<path> params` / `TO:<path> params`.
    pub(super) fn split_arg<'a>(args: &'a str, keyword: &str) -> Option<(&'a str, &'a str)> {
        let head = args.get(..keyword.len())?;
        if !head.eq_ignore_ascii_case(keyword) {
            return None;
        }
        let rest = args.get(keyword.len()..)?;
        // Be lenient on a space after the colon (common), nothing else.
        let rest = rest.strip_prefix(' ').unwrap_or(rest);
        let (path, params) = split_path(rest)?;
        if !(params.is_empty() || params.starts_with(' ')) {
            return None;
        }
        Some((path, params))
    }

    pub(super) fn cmd_mail(&mut self, args: &str, now: Time) {
        let err = |s: &mut Session, reply: Reply| s.send(reply, Duration::ZERO, false, now);
        if self.helo.is_none() {
            return err(self, r(503, (5, 5, 1), "Send HELO/EHLO first"));
        }
        if self.tx.is_some() {
            return err(self, r(503, (5, 5, 1), "Nested MAIL command"));
        }
        let Some((path, params)) = Self::split_arg(args, "FROM:") else {
            return err(self, r(501, (5, 1, 7), "Syntax: MAIL FROM:<address>"));
        };
        let offered = self.offered();
        let params = match parse_mail_params(params, offered, self.config.max_message_size) {
            Ok(p) => p,
            Err(e) => return err(self, param_error(e)),
        };
        let from = match parse_reverse_path(path, params.smtputf8) {
            Ok(p) => p,
            Err(PathError::NeedsSmtpUtf8) => {
                return err(self, r(553, (5, 6, 7), "Non-ASCII addresses require SMTPUTF8"))
            }
            Err(_) => return err(self, r(501, (5, 1, 7), "Bad sender address syntax")),
        };
        self.wait(Awaiting::Mail { from: from.clone(), params: params.clone() }, Event::Mail { from, params });
    }

    pub(super) fn cmd_rcpt(&mut self, args: &str, now: Time) {
        let err = |s: &mut Session, reply: Reply| s.send(reply, Duration::ZERO, false, now);
        if self.helo.is_none() {
            return err(self, r(503, (5, 5, 1), "Send HELO/EHLO first"));
        }
        let Some(tx) = &self.tx else {
            return err(self, r(503, (5, 5, 1), "Need MAIL command"));
        };
        let utf8 = tx.params.smtputf8;
        let count = tx.recipients.len();
        if tx.bdat.is_some() {
            return err(self, r(503, (5, 5, 1), "RCPT not allowed during BDAT"));
        }
        let Some((path, params)) = Self::split_arg(args, "TO:") else {
            return err(self, r(501, (5, 1, 3), "Syntax: RCPT TO:<address>"));
        };
        let params = match parse_rcpt_params(params, self.offered()) {
            Ok(p) => p,
            Err(e) => return err(self, param_error(e)),
        };
        let to = match parse_forward_path(path, utf8) {
            Ok(p) => p,
            Err(PathError::NeedsSmtpUtf8) => {
                return err(self, r(553, (5, 6, 7), "Non-ASCII addresses require SMTPUTF8"))
            }
            Err(_) => return err(self, r(501, (5, 1, 3), "Bad recipient address syntax")),
        };
        if count >= self.config.max_recipients {
            return err(self, r(452, (4, 5, 3), "Too many recipients"));
        }
        self.wait(Awaiting::Rcpt { to: to.clone(), params: params.clone() }, Event::Rcpt { to, params });
    }

    pub(super) fn cmd_bdat(&mut self, args: &str, now: Time) {
        let mut it = args.split(' ').filter(|s| !s.is_empty());
        let size = it
            .next()
            .filter(|s| s.len() <= 19 && s.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|s| s.parse::<u64>().ok());
        let last = match it.next() {
            None => Some(false),
            Some(l) if l.eq_ignore_ascii_case("LAST") => Some(true),
            Some(_) => None,
        };
        let (Some(size), Some(last), None) = (size, last, it.next()) else {
            // Without a valid size we cannot find the end of the chunk:
            // anything after could be chunk data, so close.
            return self.send(r(501, (5, 5, 4), "Syntax: BDAT size [LAST]"), Duration::ZERO, true, now);
        };
        let discard = |reply: Reply| Receiving::Bdat {
            remaining: size,
            last,
            sink: BdatSink::Discard { reply, delay: Duration::ZERO, close: false },
        };
        if !self.config.extensions.chunking {
            self.phase = discard(r(502, (5, 5, 1), "BDAT not available"));
            return;
        }
        if let Some(e) = self.data_precheck() {
            self.phase = discard(e);
            return;
        }
        let started = self.tx.as_ref().is_some_and(|t| t.bdat.is_some());
        if started {
            self.phase = Receiving::Bdat { remaining: size, last, sink: BdatSink::Store };
        } else {
            self.wait(Awaiting::Data { bdat: Some((size, last)) }, Event::Data { chunked: true });
        }
    }

    pub(super) fn cmd_auth(&mut self, args: &str, now: Time) {
        let err = |s: &mut Session, reply: Reply| s.send(reply, Duration::ZERO, false, now);
        if self.config.auth_mechanisms.is_empty() {
            return err(self, r(502, (5, 5, 1), "AUTH not available"));
        }
        if !matches!(self.helo, Some((_, true))) {
            return err(self, r(503, (5, 5, 1), "Send EHLO first"));
        }
        if !self.auth_offered() {
            return err(self, r(530, (5, 7, 0), "Must issue a STARTTLS command first"));
        }
        if self.auth.is_some() {
            return err(self, r(503, (5, 5, 1), "Already authenticated"));
        }
        if self.tx.is_some() {
            return err(self, r(503, (5, 5, 1), "AUTH not allowed during a mail transaction"));
        }
        let mut it = args.split(' ').filter(|s| !s.is_empty());
        let (Some(mech), ir, None) = (it.next(), it.next(), it.next()) else {
            return err(self, r(501, (5, 5, 4), "Syntax: AUTH mechanism [initial-response]"));
        };
        let Some(mechanism) = self.config.auth_mechanisms.iter().find(|m| m.eq_ignore_ascii_case(mech)).cloned() else {
            return err(self, r(504, (5, 5, 4), "Unrecognized authentication type"));
        };
        let data = match ir {
            None => None,
            Some("=") => Some(Vec::new()),
            Some(b) => match BASE64.decode(b.as_bytes()) {
                Ok(d) => Some(d),
                Err(_) => return err(self, r(501, (5, 5, 2), "Invalid base64 data")),
            },
        };
        self.wait(Awaiting::AuthStep { mechanism: mechanism.clone() }, Event::AuthStep { mechanism, data });
    }

    pub(super) fn auth_response(&mut self, mechanism: String, text: &str, now: Time) {
        if text == "*" {
            self.events.push_back(Event::AuthCancelled);
            return self.send(r(501, (5, 7, 0), "Authentication cancelled"), Duration::ZERO, false, now);
        }
        match BASE64.decode(text.as_bytes()) {
            Ok(data) => self.wait(
                Awaiting::AuthStep { mechanism: mechanism.clone() },
                Event::AuthStep { mechanism, data: Some(data) },
            ),
            Err(_) => {
                self.events.push_back(Event::AuthCancelled);
                self.send(r(501, (5, 5, 2), "Invalid base64 data"), Duration::ZERO, false, now)
            }
        }
    }
}

pub(super) fn param_error(e: ParamError) -> Reply {
    match e {
        ParamError::Syntax(m) => r(501, (5, 5, 4), m),
        ParamError::Unsupported => r(555, (5, 5, 4), "Unsupported parameter"),
        ParamError::TooBig => r(552, (5, 3, 4), "Message size exceeds fixed maximum message size"),
    }
}
