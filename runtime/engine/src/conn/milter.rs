//! Milters at each SMTP stage (spec/language.md, "Milters"): what `Conn` asks the host
//! (the stage's [`crate::milter::Step`] and its macros, as [`MilterCall`]), and how it
//! takes the answers: facts for the policy (`milter.NAME.verdict`, `.reply`), a refusal
//! that takes effect unless the policy refuses first, and the end-of-message
//! modifications applied through the same effects as the policy's own. Still no I/O: the
//! daemon drives the sockets (`daemon/src/milter.rs`), `mailc test` answers from the
//! transcript's `milter NAME:` lines.

use mailpolicy_lang::ir::{Resource, Stage};
use mailpolicy_lang::resources::{MilterAction, MilterOptions, MilterVerdicts, Options};

use super::{Conn, HostWait, Need, TxRcpt};
use crate::eval::{Effect, MilterFacts, Outcome};
use crate::milter::{Family, MilterReply, MilterVerdict, Modification, Step};
use crate::smtp::{Event, ForwardPath, Reply, ReversePath, Time};

/// What [`Need::Milter`] asks: give `step` with `macros` to each milter of the policy in
/// order and answer [`Conn::milter_replied`] (stop at the first whose answer
/// [`Conn::milter_stops`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MilterCall {
    pub stage: Stage,
    pub step: Step,
    pub macros: Vec<(String, String)>,
    /// At data: message bytes after the in-memory part, which the host holds; the host
    /// then gives the milter the whole message ([`crate::milter::split_message`]).
    pub spilled: u64,
}

/// What a milter answered, as the host got it: its outcome, or why it could not answer
/// (down, timed out, broke the protocol); then the milter's `default_action` applies.
pub type MilterAnswer = Result<MilterReply, String>;

/// RFC 3461 xtext: `+`, `=` and what is not printable ASCII as `+XX`.
fn xtext(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if (b'!'..=b'~').contains(&b) && b != b'+' && b != b'=' {
            out.push(b as char);
        } else {
            out.push_str(&format!("+{b:02X}"));
        }
    }
    out
}

fn reply(code: u16, enhanced: (u8, u16, u16), text: &str) -> Reply {
    Reply::new(code, enhanced, text)
}

/// Postfix's replies for a milter's reject and tempfail.
fn rejected() -> Reply {
    reply(550, (5, 7, 1), "Command rejected")
}
fn tempfailed() -> Reply {
    reply(451, (4, 7, 1), "Service unavailable - try again later")
}

impl Conn {
    /// The policy's milters, in declaration order (the order they are consulted).
    /// Those of this session: the listener's `milters` (all by default), or for a local
    /// submission the server's `non_smtpd_milters` (none by default, as Postfix).
    pub fn milters(&self) -> Vec<&Resource> {
        let chosen = if self.local_submission {
            Some(&self.prog.server.non_smtpd_milters)
        } else {
            self.prog.listener(&self.facts.listener).and_then(|l| l.milters.as_ref())
        };
        self.prog.scanners.iter().filter(|s| s.kind == "milter" && chosen.is_none_or(|c| c.contains(&s.name))).collect()
    }

    /// The options of the milter `name`.
    fn milter(&self, name: &str) -> Option<&MilterOptions> {
        self.prog.scanners.iter().find(|s| s.name == name).and_then(|s| match &s.options {
            Options::Milter(o) => Some(o),
            _ => None,
        })
    }

    /// After this answer the host consults no further milter for the stage: an
    /// enforcing milter refused (or failed with a refusing default action).
    pub fn milter_stops(&self, name: &str, answer: &MilterAnswer) -> bool {
        let Some(m) = self.milter(name) else { return false };
        match answer {
            Ok(o) => {
                m.verdicts != MilterVerdicts::Report
                    && matches!(
                        o.verdict,
                        MilterVerdict::Reject
                            | MilterVerdict::Tempfail
                            | MilterVerdict::Discard
                            | MilterVerdict::Reply { .. }
                    )
            }
            Err(_) => m.default_action != MilterAction::Accept,
        }
    }

    /// The macros milters get at this point of the session (Postfix's defaults, all of
    /// them at every stage; a milter narrows them with `SETSYMLIST`).
    fn milter_macros(&self, stage: Stage) -> Vec<(String, String)> {
        let f = &self.facts;
        let hostname = self.session.config().hostname.clone();
        let mut m: Vec<(String, String)> = Vec::new();
        let mut put = |k: &str, v: String| m.push((k.to_string(), v));
        put("j", hostname.clone());
        put("{daemon_name}", if f.listener.is_empty() { hostname.clone() } else { f.listener.clone() });
        put("{daemon_addr}", f.local_ip.to_string());
        put("{daemon_port}", f.local_port.to_string());
        put("{if_name}", hostname.clone());
        put("{if_addr}", f.local_ip.to_string());
        put("v", "mailpolicy".into());
        put("_", format!("{} [{}]", f.client_name, f.client_ip));
        put("{client_addr}", f.client_ip.to_string());
        put("{client_port}", f.client_port.to_string());
        put("{client_name}", f.client_name.clone());
        put("{client_ptr}", if f.client_ptr.is_empty() { "unknown".into() } else { f.client_ptr.clone() });
        put("{client_resolve}", if f.client_fcrdns { "OK".into() } else { "FAIL".into() });
        if stage == Stage::Connect {
            return m;
        }
        if let Some(t) = &f.tls {
            put("{tls_version}", t.version.clone());
            put("{cipher}", t.cipher.clone());
        }
        if stage == Stage::Helo {
            return m;
        }
        put("i", self.milter_queue_id());
        if let Some((user, mech)) = &f.auth {
            put("{auth_type}", mech.clone());
            put("{auth_authen}", user.clone());
            put("{auth_author}", user.clone());
        }
        if let Some(s) = &f.sender {
            let (_, domain) = mailpolicy_stdlib::address::split(s);
            put("{mail_addr}", s.clone());
            put("{mail_host}", domain);
            put("{mail_mailer}", if s.is_empty() { "local".into() } else { "smtp".into() });
        }
        if let (Stage::Rcpt, Some(r)) = (stage, &f.recipient) {
            let (_, domain) = mailpolicy_stdlib::address::split(&r.address);
            let local = domain.is_empty()
                || f.local_domains.iter().any(|p| mailpolicy_stdlib::address::domain_matches(p, &domain));
            put("{rcpt_addr}", r.address.clone());
            put("{rcpt_host}", domain);
            put("{rcpt_mailer}", if local { "local".into() } else { "smtp".into() });
        }
        m
    }

    /// The `i` macro: the transaction's id (the queue id is made when the message is
    /// stored, after the milters have seen it).
    fn milter_queue_id(&self) -> String {
        if let Some(id) = &self.next_queue_id {
            return id.clone();
        }
        let sid: String = self.facts.session_id.chars().filter(|c| c.is_ascii_alphanumeric()).collect();
        format!("{}{:X}", if sid.is_empty() { "0" } else { &sid }, self.milter_tx)
    }

    /// The milter step of this stage's event, when the policy has milters.
    pub(super) fn milter_call(&mut self, stage: Stage, event: &Event) -> Option<MilterCall> {
        if self.milters().is_empty() {
            return None;
        }
        let (step, spilled) = match event {
            Event::Connect => {
                let family = if self.has_remote {
                    Family::Inet(self.facts.client_ip, self.facts.client_port)
                } else {
                    Family::Unknown
                };
                let hostname = if self.facts.client_name == "unknown" {
                    format!("[{}]", self.facts.client_ip)
                } else {
                    self.facts.client_name.clone()
                };
                (Step::Connect { hostname, family }, 0)
            }
            Event::Helo { name, .. } => (Step::Helo(name.clone()), 0),
            Event::Mail { from, params } => {
                self.milter_tx += 1;
                let from = match from {
                    ReversePath::Null => "<>".to_string(),
                    ReversePath::Mailbox(m) => format!("<{m}>"),
                };
                let mut args = vec![from];
                if let Some(n) = params.size {
                    args.push(format!("SIZE={n}"));
                }
                match params.body {
                    crate::smtp::BodyType::SevenBit => {}
                    crate::smtp::BodyType::EightBitMime => args.push("BODY=8BITMIME".into()),
                    crate::smtp::BodyType::BinaryMime => args.push("BODY=BINARYMIME".into()),
                }
                if params.smtputf8 {
                    args.push("SMTPUTF8".into());
                }
                if let Some(r) = params.ret {
                    args.push(format!("RET={}", format!("{r:?}").to_ascii_uppercase()));
                }
                if let Some(e) = &params.envid {
                    args.push(format!("ENVID={}", xtext(e)));
                }
                if let Some(a) = &params.auth {
                    args.push(format!("AUTH={}", if a == "<>" { a.clone() } else { xtext(a) }));
                }
                (Step::Mail(args), 0)
            }
            Event::Rcpt { to, params } => {
                let to = match to {
                    ForwardPath::Postmaster => "<postmaster>".to_string(),
                    ForwardPath::Mailbox(m) => format!("<{m}>"),
                };
                let mut args = vec![to];
                if let Some(n) = &params.notify {
                    let mut w = Vec::new();
                    for (on, name) in
                        [(n.never, "NEVER"), (n.success, "SUCCESS"), (n.failure, "FAILURE"), (n.delay, "DELAY")]
                    {
                        if on {
                            w.push(name);
                        }
                    }
                    args.push(format!("NOTIFY={}", w.join(",")));
                }
                if let Some(o) = &params.orcpt {
                    args.push(format!("ORCPT={};{}", o.addr_type, xtext(&o.address)));
                }
                (Step::Rcpt(args), 0)
            }
            Event::Message { data, spilled, .. } => {
                let (headers, body) = crate::milter::split_message(data);
                let eom_macros = vec![("i".to_string(), self.milter_queue_id())];
                (Step::Message { headers, body: body.to_vec(), eom_macros }, *spilled)
            }
            _ => return None,
        };
        Some(MilterCall { stage, step, macros: self.milter_macros(stage), spilled })
    }

    /// Answer [`Need::Milter`]: each consulted milter's answer, in order. The stage's
    /// policy then runs with the answers as facts.
    pub fn milter_replied(&mut self, answers: Vec<(String, MilterAnswer)>, _now: Time) {
        let HostWait::Milter { stage, event } = std::mem::replace(&mut self.pending, HostWait::None) else {
            return;
        };
        self.facts.milters.clear();
        self.milter_refusal = None;
        self.milter_mods.clear();
        let names: Vec<String> = self.milters().iter().map(|m| m.name.clone()).collect();
        for name in names {
            self.facts.milters.push(MilterFacts { name, verdict: "continue".into(), reply: String::new() });
        }
        for (name, answer) in answers {
            let Some(opts) = self.milter(&name).cloned() else { continue };
            let enforce = opts.verdicts != MilterVerdicts::Report;
            let (word, text, refusal) = match answer {
                Ok(o) => {
                    let quarantine = o.modifications.iter().find_map(|m| match m {
                        Modification::Quarantine(r) => Some(r.clone()),
                        _ => None,
                    });
                    let refusal = match &o.verdict {
                        MilterVerdict::Reject => Some(Outcome::Reject(rejected())),
                        MilterVerdict::Tempfail => Some(Outcome::Tempfail(tempfailed())),
                        MilterVerdict::Discard => Some(Outcome::Discard),
                        MilterVerdict::Reply { code, enhanced, text } => {
                            let class = code / 100;
                            let e = enhanced.unwrap_or((class as u8, 7, 1));
                            let r = reply(*code, e, if text.is_empty() { "Command rejected" } else { text });
                            Some(if class == 5 { Outcome::Reject(r) } else { Outcome::Tempfail(r) })
                        }
                        MilterVerdict::Continue | MilterVerdict::Accept => None,
                    };
                    let text = match &refusal {
                        Some(Outcome::Reject(r) | Outcome::Tempfail(r)) => r.line(),
                        _ => quarantine.clone().unwrap_or_default(),
                    };
                    let word = match (&quarantine, &o.verdict) {
                        (Some(_), MilterVerdict::Continue | MilterVerdict::Accept) => "quarantine",
                        (_, v) => v.word(),
                    };
                    if stage == Stage::Data {
                        for m in o.modifications {
                            match m {
                                Modification::Quarantine(r) if enforce => {
                                    self.milter_mods.push(Modification::Quarantine(if r.is_empty() {
                                        format!("milter {name}")
                                    } else {
                                        r
                                    }))
                                }
                                Modification::Quarantine(_) => {}
                                m => self.milter_mods.push(m),
                            }
                        }
                    }
                    self.notes.push_back(Need::Note(super::Note::Log(format!(
                        "milter {name}: {} {word}{}",
                        stage.name(),
                        if text.is_empty() { String::new() } else { format!(" {text}") }
                    ))));
                    (word, text, refusal.filter(|_| enforce))
                }
                Err(e) => {
                    let action = opts.default_action;
                    self.notes.push_back(Need::Note(super::Note::Log(format!(
                        "milter {name}: {} error ({e}); default action {}",
                        stage.name(),
                        action.as_str()
                    ))));
                    let refusal = match action {
                        MilterAction::Accept => None,
                        MilterAction::Reject => Some(Outcome::Reject(rejected())),
                        MilterAction::Tempfail => Some(Outcome::Tempfail(tempfailed())),
                    };
                    ("error", e, refusal)
                }
            };
            if let Some(f) = self.facts.milters.iter_mut().find(|f| f.name == name) {
                f.verdict = word.to_string();
                f.reply = text;
            }
            if self.milter_refusal.is_none() {
                self.milter_refusal = refusal;
            }
        }
        self.pending = HostWait::None;
        self.run_stage(stage, event);
    }

    /// A milter's refusal takes effect where the policy did not refuse.
    pub(super) fn milter_verdict(&mut self, outcome: &mut Outcome) -> bool {
        let Some(r) = self.milter_refusal.take() else { return false };
        if matches!(outcome, Outcome::Default | Outcome::Accept) {
            *outcome = r;
            return true;
        }
        false
    }

    /// The end-of-message modifications, through the transaction's effects.
    pub(super) fn apply_milter_mods(&mut self) {
        let mods = std::mem::take(&mut self.milter_mods);
        let bare = |a: &str| a.trim().trim_start_matches('<').trim_end_matches('>').to_string();
        let mut effects = Vec::new();
        for m in mods {
            // An address with white space or a control character is not an address: the
            // modification is refused (logged), the rest applies.
            let bad = match &m {
                Modification::ChangeFrom { address, .. }
                | Modification::AddRcpt { address, .. }
                | Modification::DelRcpt(address) => {
                    bare(address).chars().any(|c| c.is_control() || c.is_whitespace()) || address.len() > 512
                }
                _ => false,
            };
            if bad {
                self.notes.push_back(Need::Note(super::Note::Log(format!("milter modification refused: {m:?}"))));
                continue;
            }
            match m {
                Modification::AddHeader { name, value } => effects.push(Effect::HeaderAppend { name, value }),
                Modification::InsertHeader { index, name, value } => {
                    effects.push(Effect::HeaderInsert { index, name, value })
                }
                Modification::ChangeHeader { index, name, value } => {
                    effects.push(Effect::HeaderChange { index, name, value })
                }
                Modification::ChangeFrom { address, .. } => effects.push(Effect::RewriteSender(bare(&address))),
                Modification::Quarantine(reason) => effects.push(Effect::Hold(reason)),
                Modification::AddRcpt { address, .. } => {
                    let mut rcpt = self.rcpt_record();
                    rcpt.address = bare(&address);
                    rcpt.notify = Vec::new();
                    rcpt.orcpt = String::new();
                    self.tx.rcpts.push(TxRcpt { rcpt, discard: false });
                }
                Modification::DelRcpt(address) => {
                    let a = bare(&address);
                    for r in self.tx.rcpts.iter_mut().filter(|r| r.rcpt.address.eq_ignore_ascii_case(&a)) {
                        r.discard = true;
                    }
                }
                Modification::ReplaceBody(b) => self.tx.body = Some(b),
            }
        }
        self.apply_tx_effects(&effects);
    }
}

#[cfg(test)]
mod selection_tests {
    use std::sync::Arc;

    use crate::conn::{ClientInfo, Conn};
    use crate::smtp::{Config, PeerInfo, Time};

    fn conn(policy: &str, listener: &str, local_user: Option<&str>) -> Conn {
        let c = mailpolicy_lang::compile("p.mailpolicy", &mailpolicy_lang::MemLoader::single("p.mailpolicy", policy));
        let prog = Arc::new(c.program.expect("compiles"));
        let peer = PeerInfo { remote: Some(([127, 0, 0, 1], 40000).into()), local: None, tls: None };
        let client = ClientInfo { listener: listener.into(), ..Default::default() };
        let mut c = Conn::new(prog, Config::default(), peer, client, Time(0));
        if let Some(u) = local_user {
            c.preauthenticate_local(u);
        }
        c
    }

    fn names(c: &Conn) -> Vec<String> {
        c.milters().iter().map(|m| m.name.clone()).collect()
    }

    const MILTERS: &str =
        "scanner dkim = milter \"inet:127.0.0.1:8891\";\nscanner spam = milter \"unix:/run/s.sock\";\n";

    /// Postfix's smtpd_milters and non_smtpd_milters: every milter on a listener by
    /// default, the listener's `milters` when it names them, and for local submissions
    /// the server's `non_smtpd_milters`, none by default.
    #[test]
    fn a_session_uses_its_listeners_milters_and_a_local_submission_the_servers() {
        let p = format!(
            "{MILTERS}listener mx {{ address \"0.0.0.0:25\"; }}\nlistener re {{ address \"127.0.0.1:26\"; milters []; }}\nlistener sub {{ address \"0.0.0.0:587\"; milters [\"spam\"]; }}\n"
        );
        assert_eq!(names(&conn(&p, "mx", None)), ["dkim", "spam"]);
        assert!(names(&conn(&p, "re", None)).is_empty());
        assert_eq!(names(&conn(&p, "sub", None)), ["spam"]);
        assert!(names(&conn(&p, "local", Some("alice"))).is_empty());
        let p = format!("{MILTERS}server {{ non_smtpd_milters [\"dkim\"]; }}\n");
        assert_eq!(names(&conn(&p, "local", Some("alice"))), ["dkim"]);
    }
}
