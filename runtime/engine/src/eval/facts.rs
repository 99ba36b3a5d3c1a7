//! What a stage is evaluated over: the facts of the session, the transaction, the
//! recipient and the delivery, and the evaluation state kept between stages.

use std::net::IpAddr;

use mailpolicy_lang::ir::*;

use super::*;

/// Facts about the TLS layer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsFacts {
    pub version: String,
    pub cipher: String,
    pub client_cert: bool,
    pub client_fingerprint: String,
}

/// A recipient being decided (rcpt) or routed and delivered (queue side).
#[derive(Clone, Debug, Default)]
pub struct RcptFacts {
    pub address: String,
    /// A source route or `%`/`!`/`@` in the local part was given.
    pub routing: bool,
    /// NOTIFY values, upper case.
    pub notify: Vec<String>,
    pub orcpt: String,
    /// The address as the client wrote it when the server took a BATV tag off it
    /// (`prvs=...=user@domain`, R29): `batv valid` checks this one.
    pub batv_tagged: Option<String>,
}

/// The outcome of one delivery attempt (deliver stage).
#[derive(Clone, Debug, Default)]
pub struct DeliveryFacts {
    pub code: u16,
    pub status: String,
    pub text: String,
    pub host: String,
    pub attempts: u32,
}

/// Everything the policy can read. The host fills what exists at the current stage.
#[derive(Clone, Debug)]
pub struct Facts {
    pub now_ms: u64,
    pub client_ip: IpAddr,
    pub client_port: u16,
    pub client_name: String,
    pub client_ptr: String,
    pub client_fcrdns: bool,
    pub local_ip: IpAddr,
    pub local_port: u16,
    pub listener: String,
    pub session_id: String,
    pub session_errors: u32,
    pub tls: Option<TlsFacts>,
    pub helo: Option<(String, bool)>,
    /// (user, mechanism)
    pub auth: Option<(String, String)>,
    /// The mechanism of the AUTH that just failed (the auth stage of a failed login).
    pub auth_failed: Option<String>,
    /// None before MAIL; Some("") for the null sender.
    pub sender: Option<String>,
    pub mail_size: u64,
    pub mail_body: String,
    pub smtputf8: bool,
    pub dsn_ret: String,
    pub dsn_envid: String,
    pub recipient: Option<RcptFacts>,
    /// Accepted recipients so far (rcpt) or all of them (data and later).
    pub recipients: Vec<String>,
    /// The server's local domains (domain-list entries), for `recipient.is_local`.
    pub local_domains: Vec<String>,
    pub message: Option<MessageFacts>,
    pub queue_id: String,
    pub delivery: Option<DeliveryFacts>,
    pub queue_age_ms: u64,
    /// (type, reason) of the DSN being decided.
    pub bounce: Option<(String, String)>,
    /// Each milter's answer to the stage being evaluated (`milter.NAME.verdict`,
    /// `milter.NAME.reply`), set by `Conn` before the stage runs.
    pub milters: Vec<MilterFacts>,
    /// On the queue side: the sender-authentication results the session computed for this
    /// message (`spf`, `dkim`, `dmarc`, `dmarc_policy` read them, nothing is asked). None in
    /// a session, where `Conn` answers them ([`SessionStep::SenderAuth`]).
    pub recorded_auth: Option<AuthWords>,
}

/// Sender-authentication results as the policy reads them, kept with a queued message.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct AuthWords {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spf: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dkim: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dmarc: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dmarc_policy: Option<String>,
}

impl AuthWords {
    /// The word recorded for `check`, if the session computed it.
    pub fn get(&self, check: AuthCheck) -> Option<&str> {
        match check {
            AuthCheck::Spf => self.spf.as_deref(),
            AuthCheck::Dkim => self.dkim.as_deref(),
            AuthCheck::Dmarc => self.dmarc.as_deref(),
            AuthCheck::DmarcPolicy => self.dmarc_policy.as_deref(),
        }
    }

    pub fn is_empty(&self) -> bool {
        *self == AuthWords::default()
    }
}

/// What one milter answered the current stage.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MilterFacts {
    pub name: String,
    /// continue, accept, reject, tempfail, discard, quarantine, or error (the milter is
    /// down, timed out or broke the protocol).
    pub verdict: String,
    /// Its reply as the client would see it (`550 5.7.1 text`), or the error; empty
    /// when it has none.
    pub reply: String,
}

impl Default for Facts {
    fn default() -> Facts {
        let unspecified = IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED);
        Facts {
            now_ms: 0,
            client_ip: unspecified,
            client_port: 0,
            client_name: "unknown".into(),
            client_ptr: String::new(),
            client_fcrdns: false,
            local_ip: unspecified,
            local_port: 0,
            listener: String::new(),
            session_id: String::new(),
            session_errors: 0,
            tls: None,
            helo: None,
            auth: None,
            auth_failed: None,
            sender: None,
            mail_size: 0,
            mail_body: String::new(),
            smtputf8: false,
            dsn_ret: String::new(),
            dsn_envid: String::new(),
            recipient: None,
            recipients: Vec::new(),
            local_domains: vec!["localhost".into()],
            message: None,
            queue_id: String::new(),
            delivery: None,
            queue_age_ms: 0,
            bounce: None,
            milters: Vec::new(),
            recorded_auth: None,
        }
    }
}

/// Variables and the session-long results of earlier stages.
#[derive(Clone, Debug, Default)]
pub struct State {
    /// One slot per `Program::vars`.
    pub vars: Vec<Option<String>>,
    /// (zone, answer, text) of the last DNSBL/RHSBL test that was true.
    pub dnsbl_hit: Option<(String, String, String)>,
    /// (code, text) of the last call-ahead.
    pub callahead: Option<(u16, String)>,
    /// A refusal an `access ... :delay` held for the recipients (sendmail's delay_checks):
    /// from connect, helo or auth for the session, from mail for the transaction.
    pub delayed: Option<DelayedRefusal>,
    /// What the rcpt stage's `access` said about the current recipient: FRIEND (true) or
    /// HATER (false); reset for each recipient.
    pub rcpt_friend: Option<bool>,
}

/// A refusal held for the recipients by `access TABLE :delay`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DelayedRefusal {
    pub outcome: Outcome,
    pub mode: AccessDelay,
    /// The `access` action that found it.
    pub loc: LocId,
    /// Set at mail: ends with the transaction.
    pub transaction: bool,
}

impl State {
    /// The held refusal, if it reaches the current recipient (`access ... :delay`): every
    /// recipient but a FRIEND, or with `:delay hater` only a HATER.
    pub fn delayed_for_recipient(&self) -> Option<&DelayedRefusal> {
        let d = self.delayed.as_ref()?;
        let reaches = match d.mode {
            AccessDelay::Hater => self.rcpt_friend == Some(false),
            _ => self.rcpt_friend != Some(true),
        };
        reaches.then_some(d)
    }
}

impl State {
    pub fn new(prog: &Program) -> State {
        State { vars: vec![None; prog.vars.len()], ..Default::default() }
    }
    /// Forget variables of the given scope (RSET / end of message: `Transaction`).
    pub fn clear(&mut self, prog: &Program, scope: Scope) {
        for (slot, var) in self.vars.iter_mut().zip(&prog.vars) {
            if var.scope == scope {
                *slot = None;
            }
        }
        if scope == Scope::Transaction {
            self.callahead = None;
            self.rcpt_friend = None;
            if self.delayed.as_ref().is_some_and(|d| d.transaction) {
                self.delayed = None;
            }
        }
        if scope == Scope::Session {
            self.delayed = None;
        }
    }
}
