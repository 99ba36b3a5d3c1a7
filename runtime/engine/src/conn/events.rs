//! The SMTP engine's events to policy stages: each event's facts set, the stage it starts
//! (connect, helo, auth, mail, rcpt, data), and the checks made before a stage runs (the
//! hop count of a mail loop, the queue's free space).

use super::*;

impl Conn {
    fn start(&mut self, stage: Stage, event: Event) -> Option<Need> {
        use mailpolicy_lang::ir::Counter;
        let counter = match stage {
            Stage::Connect => Some(Counter::Connections),
            Stage::Mail => Some(Counter::Messages),
            Stage::Rcpt => Some(Counter::Recipients),
            _ => None,
        };
        if let Some(counter) = counter {
            let keys = crate::eval::event_keys(&self.facts);
            if stage == Stage::Mail && self.facts.sender.as_deref() == Some("") {
                let keys = keys.clone();
                self.notes.push_back(Need::Note(Note::Count { counter: Counter::Bounces, keys }));
            }
            self.notes.push_back(Need::Note(Note::Count { counter, keys }));
        }
        if stage == Stage::Rcpt {
            self.state.rcpt_friend = None;
        }
        if let Some(call) = self.milter_call(stage, &event) {
            self.pending = HostWait::Milter { stage, event };
            self.notes.push_back(Need::Milter(call));
            return None;
        }
        self.run_stage(stage, event);
        None
    }

    pub(super) fn run_stage(&mut self, stage: Stage, event: Event) {
        let run = if self.tracing { Run::new(&self.prog, stage) } else { Run::new(&self.prog, stage).untraced() };
        self.pending = HostWait::Stage { run, event };
    }

    pub(super) fn on_event(&mut self, ev: Event, now: Time) -> Option<Need> {
        match ev {
            Event::Connect => self.start(Stage::Connect, ev),
            Event::Helo { ref name, extended } => {
                // A new HELO/EHLO ends any transaction.
                self.end_transaction();
                self.facts.helo = Some((name.clone(), extended));
                self.start(Stage::Helo, ev)
            }
            Event::Auth { ref mechanism, ref user } => {
                self.facts.auth = Some((user.clone(), mechanism.clone()));
                self.start(Stage::Auth, ev)
            }
            Event::AuthFailed { ref mechanism } => {
                // The auth stage runs for failed logins too (spec section 6), unauthenticated.
                self.facts.auth = None;
                self.facts.auth_failed = Some(mechanism.clone());
                self.start(Stage::Auth, ev)
            }
            Event::Mail { ref from, ref params } => {
                self.end_transaction();
                // Listener `tls required;` / `auth required;` (RFC 3207 4, RFC 4954 6).
                let refuse = if self.require_tls && self.facts.tls.is_none() {
                    Some("Must issue a STARTTLS command first")
                } else if self.require_auth && self.facts.auth.is_none() {
                    Some("Authentication required")
                } else {
                    None
                };
                if let Some(text) = refuse {
                    let reply = Reply::new(530, (5, 7, 0), text);
                    let _ = self.session.decide(Decision::reject(reply), now);
                    return None;
                }
                // Disk space before the upload, not after it (Postfix `queue_minfree`).
                if let Some(free) = self.free_space {
                    if free < self.queue_minfree().saturating_add(params.size.unwrap_or(0)) {
                        self.notes.push_back(Need::Note(Note::Log(format!(
                            "MAIL refused: {free} bytes free in the spool, queue_minfree {} plus SIZE {}",
                            self.queue_minfree(),
                            params.size.unwrap_or(0)
                        ))));
                        let reply = Reply::new(452, (4, 3, 1), "Insufficient system storage");
                        let _ = self.session.decide(Decision::reject(reply), now);
                        return None;
                    }
                }
                self.facts.sender = Some(match from {
                    ReversePath::Null => String::new(),
                    ReversePath::Mailbox(m) => m.to_string(),
                });
                self.facts.mail_size = params.size.unwrap_or(0);
                self.facts.mail_body = format!("{:?}", params.body)
                    .to_ascii_uppercase()
                    .replace("SEVENBIT", "7BIT")
                    .replace("EIGHTBITMIME", "8BITMIME");
                self.facts.smtputf8 = params.smtputf8;
                self.facts.dsn_ret = params.ret.map(|r| format!("{r:?}").to_ascii_uppercase()).unwrap_or_default();
                self.facts.dsn_envid = params.envid.clone().unwrap_or_default();
                self.start(Stage::Mail, ev)
            }
            Event::Rcpt { ref to, ref params } => {
                let address = match to {
                    ForwardPath::Postmaster => "postmaster".to_string(),
                    ForwardPath::Mailbox(m) => m.to_string(),
                };
                let mut notify = Vec::new();
                if let Some(n) = &params.notify {
                    if n.never {
                        notify.push("NEVER".to_string());
                    }
                    if n.success {
                        notify.push("SUCCESS".to_string());
                    }
                    if n.failure {
                        notify.push("FAILURE".to_string());
                    }
                    if n.delay {
                        notify.push("DELAY".to_string());
                    }
                }
                let orcpt = params.orcpt.as_ref().map(|o| format!("{};{}", o.addr_type, o.address)).unwrap_or_default();
                // A source route (`<@hop:user@domain>`) or an `@` in a quoted local part (R15).
                let routing = matches!(to, ForwardPath::Mailbox(m) if m.routed || (m.quoted && m.local.contains('@')));
                // R29: with BATV keys, a tagged recipient (a bounce to an address we signed)
                // is routed and delivered without its tag; `batv valid` checks the tag.
                let (address, batv_tagged) = match self.prog.server.batv_keys {
                    Some(_) => match mailpolicy_stdlib::batv::strip(&address) {
                        Some(plain) => (plain, Some(address)),
                        None => (address, None),
                    },
                    None => (address, None),
                };
                self.facts.recipient = Some(RcptFacts { address, routing, notify, orcpt, batv_tagged });
                // RFC 5321 4.5.1: <postmaster> must be accepted whatever the policy says.
                if matches!(to, ForwardPath::Postmaster) {
                    let rcpt = self.rcpt_record();
                    self.tx.rcpts.push(TxRcpt { rcpt, discard: false });
                    self.facts.recipients = self.accepted_addresses();
                    let _ = self.session.decide(Decision::accept(), now);
                    return None;
                }
                self.start(Stage::Rcpt, ev)
            }
            Event::Data { .. } => {
                // The data stage runs once, on the whole message (Event::Message).
                let _ = self.session.decide(Decision::accept(), now);
                None
            }
            Event::Message { ref data, spilled, .. } => {
                self.facts.recipient = None;
                self.facts.recipients = self.accepted_addresses();
                // A large message is here up to the in-memory bound: its header section
                // whole, its body's first part (what body tests see); `message.size` is all.
                match MessageFacts::try_parse(data) {
                    Ok(mut m) => {
                        m.size = m.size.saturating_add(spilled);
                        // A mail loop ends here (Postfix hopcount_limit): each hop adds one.
                        let hops = m.headers.iter().filter(|(n, _)| n.eq_ignore_ascii_case("received")).count();
                        if hops as u64 > self.hopcount_limit() {
                            self.notes.push_back(Need::Note(Note::Log(format!(
                                "message refused: {hops} Received: fields, a mail loop (hopcount_limit)"
                            ))));
                            self.end_transaction();
                            let reply = Reply::new(554, (5, 4, 6), "Too many hops: possible mail loop");
                            let _ = self.session.decide(Decision::reject(reply), now);
                            return None;
                        }
                        self.facts.message = Some(m)
                    }
                    Err(_) => {
                        // A MIME parser defect on this message: refuse it (temporarily, the
                        // fault is ours) and keep the session.
                        self.notes.push_back(Need::Note(Note::Log(
                            "message refused: the MIME parser failed on it (parser panic contained)".into(),
                        )));
                        self.end_transaction();
                        let reply = Reply::new(451, (4, 3, 0), "Local error in processing, try again later");
                        let _ = self.session.decide(Decision::reject(reply), now);
                        return None;
                    }
                }
                self.start(Stage::Data, ev)
            }
            Event::AuthStep { mechanism, data } => self.auth_step(mechanism, data),
            Event::StartTls => Some(Need::StartTls),
            Event::Vrfy { .. } | Event::Expn { .. } => {
                // Enabled by the listener: answer as Postfix does without address verification.
                let _ = self.session.decide(
                    Decision::accept().with_reply(Reply::new(
                        252,
                        (2, 5, 2),
                        "Cannot VRFY user, but will accept message and attempt delivery",
                    )),
                    now,
                );
                None
            }
            Event::Reset => {
                self.end_transaction();
                None
            }
            _ => None,
        }
    }

    /// `hopcount_limit` (default 50, as Postfix).
    fn hopcount_limit(&self) -> u64 {
        self.prog.server.hopcount_limit
    }

    pub(super) fn accepted_addresses(&self) -> Vec<String> {
        self.tx.rcpts.iter().map(|r| r.rcpt.address.clone()).collect()
    }

    pub(super) fn rcpt_record(&self) -> QueuedRcpt {
        let r = self.facts.recipient.clone().unwrap_or_default();
        QueuedRcpt {
            address: r.address,
            notify: r.notify,
            orcpt: r.orcpt,
            batv_tagged: r.batv_tagged.unwrap_or_default(),
        }
    }
}
