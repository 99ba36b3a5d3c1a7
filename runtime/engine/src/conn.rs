//! One SMTP connection under a policy: the sans-IO session engine joined to the IR
//! evaluator. Still no I/O: everything the connection needs from the world comes out of
//! [`Conn::poll_need`] as a [`Need`], and the host (the daemon, or `mailc test` replaying
//! a transcript) answers it. Both hosts drive this same type.
//!
//! ```text
//! host loop:
//!   while let Some(need) = conn.poll_need(now) { answer it: answer / queued / auth_* / tls_established }
//!   while let Some(bytes) = conn.poll_transmit() { write bytes }
//!   read input -> conn.handle_input(bytes, now);  timer at conn.poll_timeout() -> conn.handle_timeout(now)
//! ```

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use mailpolicy_lang::ir::{DsnAction, LocId, Program, Scope, Stage};

use crate::eval::{
    Answer, Effect, Facts, MessageFacts, Outcome, RcptFacts, Request, Run, SessionStep, StageVerdict, State, TlsFacts,
};
use crate::smtp::{self, Decision, Event, ForwardPath, PeerInfo, Reply, ReversePath, Session, Time, TlsInfo};

/// Why the host could not make a message durable ([`Conn::queue_failed`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueFailure {
    /// No space left in the spool.
    Full,
    /// Any other failure of the store.
    LocalError,
    /// The queue manager is down (its supervisor is restarting it): nothing is accepted.
    QueueManagerDown,
    /// `backup_peer` did not take its copy (and `backup_on_error` is not `accept`).
    BackupFailed,
}

/// What the host learns about the client before the connect stage (reverse DNS is the
/// host's business: the daemon resolves it, a transcript gives it).
#[derive(Clone, Debug, Default)]
pub struct ClientInfo {
    /// Forward-confirmed reverse name, or "unknown".
    pub name: String,
    /// PTR name as found, unverified.
    pub ptr: String,
    pub listener: String,
    pub session_id: String,
}

pub use crate::record::{QueuedMessage, QueuedRcpt, SessionRecord};

mod events;
mod login;
mod message;
mod milter;
mod sender_auth;
mod verdicts;

pub use login::SaslResult;
use message::prepend_field;
pub use milter::{MilterAnswer, MilterCall};
pub use sender_auth::{dkim_domain_for, AuthKind, AuthQuery, AuthReport, ContentReport, MethodReport};

/// One line of the connection's log: a verdict, a log action or an alert.
#[derive(Clone, Debug, PartialEq)]
pub enum Note {
    Verdict {
        stage: Stage,
        outcome: String,
        rule: Option<LocId>,
        trace: Vec<crate::eval::Trace>,
    },
    Log(String),
    Alert {
        to: String,
        text: String,
        every_ms: u64,
    },
    /// A counted event happened: record it under each key for `rate` (R7, R22).
    Count {
        counter: mailpolicy_lang::ir::Counter,
        keys: Vec<String>,
    },
    /// A SASL exchange ended: `login` (lower case; None when none was tried)
    /// authenticated (`ok`), or failed; `throttled` says which throttle refused it
    /// (`address`, `login`; empty: none). A host that answers [`Need::LoginKnown`] records
    /// a success.
    Login {
        mechanism: String,
        login: Option<String>,
        ok: bool,
        throttled: &'static str,
    },
}

/// What the connection needs from the host.
#[derive(Clone, Debug, PartialEq)]
pub enum Need {
    /// Answer with [`Conn::answer`].
    Policy(Request),
    /// One SASL step: answer with [`Conn::auth_continue`] or [`Conn::sasl_done`].
    AuthStep { mechanism: String, data: Option<Vec<u8>> },
    /// How many `auth_failures` events this host recorded under `key` (`client.ip=IP`,
    /// `auth.login=LOGIN`) within the window; answer with [`Conn::failed_logins`].
    FailedLogins { key: String, window_ms: u64 },
    /// Did `login` authenticate from `ip` within the window ([`Note::Login`] records)?
    /// Answer with [`Conn::login_known`].
    LoginKnown { login: String, ip: std::net::IpAddr, window_ms: u64 },
    /// An SPF, DKIM or DMARC check for the policy; answer with [`Conn::sender_auth_checked`].
    SenderAuth(AuthQuery),
    /// Flush output, do the TLS handshake, then [`Conn::tls_established`] (or close).
    StartTls,
    /// Before a message is queued: its DKIM signature (B7), answered with [`Conn::signed`].
    /// Conn decided to sign and for which domain, and already added the
    /// `Authentication-Results` field; the host computes the signature (the daemon with
    /// mail-auth, `mailc` for transcripts with the same signer) over
    /// [`Conn::sealing_message`] and Conn puts it on top, so a transcript sees what the
    /// daemon stores.
    Sign(Sign),
    /// Make the message durable, then [`Conn::queued`] with its id, or [`Conn::queue_failed`].
    Queue(QueuedMessage),
    /// Consult the policy's milters on this stage, then [`Conn::milter_replied`]; the
    /// message of the data stage is [`Conn::current_message`].
    Milter(MilterCall),
    /// The listener has a before-queue filter (`proxy_filter`): instead of queueing the
    /// message, hand it to the filter in a session of its own
    /// ([`crate::before_queue::FilterSession`]), then [`Conn::proxied`] with the outcome.
    ProxyFilter(crate::before_queue::FilterCall),
    /// Informational.
    Note(Note),
}

/// What [`Need::Sign`] asks for: a `DKIM-Signature` field with the server's key and
/// selector, `d=domain`, over the message. Conn asks it when the server signs, the client
/// authenticated or is in `networks`, and `dkim_domain` covers the sender.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sign {
    pub domain: String,
    /// The envelope sender of the message.
    pub sender: String,
}

#[derive(Clone, Debug, Default)]
struct TxRcpt {
    rcpt: QueuedRcpt,
    discard: bool,
}

#[derive(Clone, Debug, Default)]
struct Tx {
    rcpts: Vec<TxRcpt>,
    discard: bool,
    hold: Option<String>,
    headers: Vec<Effect>,
    archive: Vec<String>,
    bcc: Vec<String>,
    redirect: Option<String>,
    filter: Option<crate::eval::RenderedTransport>,
    batv_sign: bool,
    sender_rewrite: Option<String>,
    ret_headers: bool,
    /// A milter replaced the body.
    body: Option<Vec<u8>>,
}

enum HostWait {
    None,
    /// A stage is being evaluated for this engine event.
    Stage {
        run: Run,
        event: Event,
    },
    /// Waiting for the host to store the message; the reply is then held this long
    /// (a `tarpit` at data).
    Queue(Duration),
    /// Waiting for [`Conn::signed`]: the message to queue, and the reply's delay.
    Seal(Box<QueuedMessage>, Duration),
    /// An AUTH exchange between the throttle checks ([`login`]).
    Auth(login::Gate),
    /// Waiting for [`Conn::proxied`]; the reply is then held this long.
    Proxy(Duration),
    /// Waiting for [`Conn::milter_replied`] before the stage runs.
    Milter {
        stage: Stage,
        event: Event,
    },
}

/// The policy settings a connection needs.
#[derive(Clone, Debug, Default)]
pub struct PolicyMode {
    /// R40 soft-bounce: every reject becomes a tempfail, 5xy to 4xy as Postfix does.
    pub soft_bounce: bool,
    /// R40 warn-only: rejects and tempfails are logged and the item accepted.
    pub warn_only: bool,
}

impl PolicyMode {
    pub fn from_program(p: &Program) -> PolicyMode {
        PolicyMode { soft_bounce: p.server.soft_bounce, warn_only: p.server.warn_only }
    }
}

pub struct Conn {
    prog: Arc<Program>,
    session: Session,
    facts: Facts,
    state: State,
    tx: Tx,
    pending: HostWait,
    /// Session-wide discard (DISCARD at connect/helo/auth).
    discard_session: bool,
    /// An access table said RELAY for this client (session) ...
    relay_session: bool,
    session_hold: Option<String>,
    mode: PolicyMode,
    notes: VecDeque<Need>,
    errors_seen: u32,
    deferred: Option<Decision>,
    /// The listener requires TLS / AUTH before MAIL.
    require_tls: bool,
    require_auth: bool,
    /// SPF, DKIM and DMARC in this transaction ([`sender_auth`]).
    sender_auth: sender_auth::SenderAuth,
    /// Free space of the spool's file system, as the host last saw it (None: unknown).
    free_space: Option<u64>,
    /// The client has an address (not a local submission).
    has_remote: bool,
    /// Transactions begun (the milters' `i` macro when the host reserves no queue id).
    milter_tx: u64,
    /// The queue id the next message will be stored under, when the host reserved one
    /// ([`Conn::set_next_queue_id`]): the milters' `i` macro, as Postfix's queue id.
    next_queue_id: Option<String>,
    /// The refusal the milters asked of the stage being evaluated, and their
    /// end-of-message modifications.
    milter_refusal: Option<Outcome>,
    milter_mods: Vec<crate::milter::Modification>,
    /// The listener's `proxy_filter`: accepted messages go there, not to the queue.
    proxy_filter: Option<String>,
    /// A local submission ([`Conn::preauthenticate_local`]).
    local_submission: bool,
    /// Whether stage verdicts carry their trace ([`Conn::set_tracing`]).
    tracing: bool,
}

impl Conn {
    pub fn new(prog: Arc<Program>, config: smtp::Config, peer: PeerInfo, client: ClientInfo, now: Time) -> Conn {
        let mut facts = Facts { now_ms: now.0, ..Facts::default() };
        if let Some(r) = peer.remote {
            facts.client_ip = canonical_ip(r.ip());
            facts.client_port = r.port();
        }
        if let Some(l) = peer.local {
            facts.local_ip = canonical_ip(l.ip());
            facts.local_port = l.port();
        }
        facts.client_name = if client.name.is_empty() { "unknown".into() } else { client.name.to_ascii_lowercase() };
        facts.client_ptr = client.ptr.to_ascii_lowercase();
        facts.client_fcrdns = facts.client_name != "unknown";
        facts.listener = client.listener;
        facts.session_id = client.session_id;
        facts.tls = peer.tls.as_ref().map(tls_facts);
        facts.local_domains = local_domains(&prog, &config.hostname);
        let state = State::new(&prog);
        let mode = PolicyMode::from_program(&prog);
        let has_remote = peer.remote.is_some();
        let proxy_filter = prog.listener(&facts.listener).and_then(|l| l.proxy_filter.clone());
        Conn {
            session: Session::new(config, peer, now),
            prog,
            facts,
            state,
            tx: Tx::default(),
            pending: HostWait::None,
            discard_session: false,
            relay_session: false,
            session_hold: None,
            mode,
            notes: VecDeque::new(),
            errors_seen: 0,
            deferred: None,
            require_tls: false,
            require_auth: false,
            sender_auth: Default::default(),
            free_space: None,
            has_remote,
            milter_tx: 0,
            next_queue_id: None,
            milter_refusal: None,
            milter_mods: Vec::new(),
            proxy_filter,
            local_submission: false,
            tracing: true,
        }
    }

    /// Whether the stages' verdicts carry their trace (`Note::Verdict`'s `trace`; on by
    /// default). A host that does not read it turns it off and saves a copy of every
    /// test, request and answer of a stage.
    pub fn set_tracing(&mut self, on: bool) {
        self.tracing = on;
    }

    /// A local submission from the operating system's user `user` (the maildrop's file
    /// owner): the session is authenticated as `user` with mechanism `local` from the start,
    /// as if it had logged in, so the policy's `authenticated`, `auth.user` and the relay
    /// rule treat it as one of the site's users (Postfix trusts local submission likewise).
    pub fn preauthenticate_local(&mut self, user: &str) {
        self.session.preauthenticate("local", user);
        self.local_submission = true;
        self.facts.auth = Some((user.to_string(), "local".to_string()));
    }

    /// The spool's free space as the host sees it now; MAIL is refused with `452 4.3.1`
    /// when it is below the server's `queue_minfree` plus the declared SIZE (Postfix).
    pub fn set_free_space(&mut self, bytes: Option<u64>) {
        self.free_space = bytes;
    }

    /// `queue_minfree`, default 1.5 × `max_message_size` (Postfix's rule).
    fn queue_minfree(&self) -> u64 {
        self.prog.server.queue_minfree.unwrap_or_else(|| self.session.config().max_message_size.saturating_mul(3) / 2)
    }

    /// Refuse MAIL until TLS is active / the client has authenticated (listener
    /// `tls required;` / `auth required;`), with 530 as RFC 3207 and RFC 4954 say.
    pub fn set_requirements(&mut self, tls: bool, auth: bool) {
        self.require_tls = tls;
        self.require_auth = auth;
    }

    /// The message whose data stage is being evaluated (for content scanners).
    pub fn current_message(&self) -> Option<&[u8]> {
        match &self.pending {
            HostWait::Stage { event: Event::Message { data, .. }, .. }
            | HostWait::Milter { event: Event::Message { data, .. }, .. } => Some(data),
            _ => None,
        }
    }

    /// The session's facts as they are now (for the host's lookups that need context).
    pub fn facts(&self) -> &Facts {
        &self.facts
    }

    pub fn program(&self) -> &Program {
        &self.prog
    }
    /// Message bytes past the in-memory part ([`Session::take_spill`]): the host appends
    /// them to the message's spill file; call after every `handle_input`.
    pub fn take_spill(&mut self) -> Option<(u64, Vec<u8>)> {
        self.session.take_spill()
    }
    pub fn session(&self) -> &Session {
        &self.session
    }
    pub fn handle_input(&mut self, bytes: &[u8], now: Time) {
        self.session.handle_input(bytes, now);
    }
    pub fn handle_timeout(&mut self, now: Time) {
        self.session.handle_timeout(now);
    }
    pub fn handle_eof(&mut self, now: Time) {
        self.session.handle_eof(now);
    }
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.session.poll_transmit()
    }
    pub fn poll_timeout(&self) -> Option<Time> {
        self.session.poll_timeout()
    }
    pub fn is_closed(&self) -> bool {
        self.session.is_closed()
    }
    pub fn input_room(&self) -> usize {
        self.session.input_room()
    }
    pub fn shutdown(&mut self, reply: Option<Reply>, now: Time) {
        self.session.shutdown(reply, now);
    }

    /// Advance as far as possible; return what is needed from the host, or None when the
    /// connection waits for input or a timer.
    pub fn poll_need(&mut self, now: Time) -> Option<Need> {
        self.facts.now_ms = now.0;
        let errors = self.session.error_count();
        // The engine resets its count when a message is accepted.
        self.errors_seen = self.errors_seen.min(errors);
        for _ in self.errors_seen..errors {
            let keys = crate::eval::event_keys(&self.facts);
            let counter = mailpolicy_lang::ir::Counter::Errors;
            self.notes.push_back(Need::Note(Note::Count { counter, keys }));
        }
        self.errors_seen = errors;
        loop {
            if let Some(n) = self.notes.pop_front() {
                return Some(n);
            }
            if let Some(d) = self.deferred.take() {
                let _ = self.session.decide(d, now);
                continue;
            }
            match &mut self.pending {
                HostWait::Queue(_)
                | HostWait::Proxy(_)
                | HostWait::Seal(..)
                | HostWait::Milter { .. }
                | HostWait::Auth(_) => return None,
                HostWait::Stage { .. } if self.sender_auth.waiting() => return None,
                HostWait::Stage { run, .. } => {
                    self.facts.session_errors = self.session.error_count();
                    match run.step_session(&self.prog, &self.facts, &mut self.state) {
                        SessionStep::SenderAuth(check) => {
                            if let Some(a) = self.sender_auth_request(check) {
                                if let HostWait::Stage { run, .. } = &mut self.pending {
                                    run.answer_sender_auth(check, a);
                                }
                            }
                        }
                        SessionStep::Need(r) => return Some(Need::Policy(r)),
                        SessionStep::Done(v) => {
                            let HostWait::Stage { event, run } = std::mem::replace(&mut self.pending, HostWait::None)
                            else {
                                continue;
                            };
                            self.finish_stage(run.stage(), event, v, now);
                        }
                    }
                }
                HostWait::None => {
                    let ev = self.session.poll_event()?;
                    if let Some(n) = self.on_event(ev, now) {
                        return Some(n);
                    }
                }
            }
        }
    }

    /// Answer the last [`Need::Policy`].
    pub fn answer(&mut self, request: Request, answer: Answer) {
        match &mut self.pending {
            HostWait::Stage { run, .. } => run.answer(request, answer),
            _ => {}
        }
    }

    pub fn auth_continue(&mut self, challenge: &[u8], now: Time) {
        let _ = self.session.auth_continue(challenge, now);
    }

    pub fn tls_established(&mut self, info: TlsInfo, now: Time) {
        self.facts.tls = Some(tls_facts(&info));
        self.reset_session_facts();
        let _ = self.session.tls_established(info, now);
    }

    /// The message a [`Need::Sign`] is about, as it will be queued but for the signature:
    /// the part in memory, and how many bytes the host spilled to disk after that part
    /// (`QueuedMessage::tail`).
    pub fn sealing_message(&self) -> Option<(&[u8], u64)> {
        match &self.pending {
            HostWait::Seal(m, _) => Some((&m.data, m.tail)),
            _ => None,
        }
    }

    /// Answer [`Need::Sign`]: the `DKIM-Signature` field (`Name: value`, folded or not),
    /// or None when the host could not sign (it says why in its log). Then
    /// [`Need::Queue`] follows.
    pub fn signed(&mut self, field: Option<&str>) {
        if let HostWait::Seal(..) = &self.pending {
            let HostWait::Seal(mut msg, delay) = std::mem::replace(&mut self.pending, HostWait::Queue(Duration::ZERO))
            else {
                return;
            };
            if let Some(f) = field {
                msg.data = prepend_field(f, &msg.data);
            }
            self.hand_over(*msg, delay);
        }
    }

    /// The accepted message goes to the queue, or to the listener's before-queue filter.
    fn hand_over(&mut self, msg: QueuedMessage, delay: Duration) {
        let Some(address) = self.proxy_filter.clone() else {
            self.pending = HostWait::Queue(delay);
            self.notes.push_back(Need::Queue(msg));
            return;
        };
        // What only a queue record carries is the re-injection listener's to decide.
        if msg.hold.is_some() || !msg.archive.is_empty() || msg.filter.is_some() || msg.batv_sign {
            self.notes.push_back(Need::Note(Note::Log(
                "proxy_filter: hold, archive, filter and batv sign of this message are not passed to the filter (the re-injection listener's policy decides them)".into(),
            )));
        }
        let xforward = crate::before_queue::xforward_attributes(&self.facts, self.local_submission);
        self.pending = HostWait::Proxy(delay);
        self.notes.push_back(Need::ProxyFilter(crate::before_queue::FilterCall { address, message: msg, xforward }));
    }

    /// Answer [`Need::ProxyFilter`]: the filter's reply is the client's; a filter that
    /// failed is `451 4.3.0` (logged with the reason).
    pub fn proxied(&mut self, outcome: &crate::before_queue::FilterOutcome, now: Time) {
        use crate::before_queue::FilterOutcome;
        let HostWait::Proxy(delay) = self.pending else {
            return;
        };
        self.pending = HostWait::None;
        let reply = match outcome {
            FilterOutcome::Replied(r) => {
                self.notes.push_back(Need::Note(Note::Log(format!("proxy_filter: {r}"))));
                r.clone()
            }
            FilterOutcome::Failed(why) => {
                self.notes.push_back(Need::Note(Note::Log(format!("proxy_filter failed: {why}"))));
                crate::before_queue::unavailable()
            }
        };
        let d = if reply.is_positive() { Decision::accept().with_reply(reply) } else { Decision::reject(reply) };
        // Nothing was stored under the reserved id; the re-injection listener has its own.
        self.next_queue_id = None;
        self.end_transaction();
        self.defer(d.with_delay(delay), now);
    }

    /// The id the host will store the next message under ([`Need::Queue`]: the host
    /// stores it as [`Conn::next_queue_id`] says): milters get it as `i` from MAIL on.
    /// The host reserves one when the session starts and a new one after each message
    /// it stored; without one, `i` is the session's transaction number.
    pub fn set_next_queue_id(&mut self, id: String) {
        self.next_queue_id = Some(id);
    }

    /// The id reserved for the next message, if any.
    pub fn next_queue_id(&self) -> Option<&str> {
        self.next_queue_id.as_deref()
    }

    /// The host stored the message durably under `id`.
    pub fn queued(&mut self, id: &str, now: Time) {
        if let HostWait::Queue(delay) = self.pending {
            self.pending = HostWait::None;
            let _ = self.session.decide(Decision::queued(id).with_delay(delay), now);
            if self.next_queue_id.as_deref() == Some(id) {
                self.next_queue_id = None;
            }
            self.end_transaction();
        }
    }

    /// The host could not store the message: the client's reply is chosen here, by why.
    pub fn queue_failed(&mut self, why: QueueFailure, now: Time) {
        if matches!(self.pending, HostWait::Queue(_)) {
            self.pending = HostWait::None;
            let r = match why {
                QueueFailure::Full => Reply::new(452, (4, 3, 1), "Insufficient system storage"),
                QueueFailure::LocalError => Reply::new(451, (4, 3, 0), "Local error in processing, try again later"),
                QueueFailure::QueueManagerDown => {
                    Reply::new(451, (4, 3, 0), "Queue manager unavailable, try again later")
                }
                QueueFailure::BackupFailed => Reply::new(451, (4, 3, 0), "Backup copy failed, try again later"),
            };
            let _ = self.session.decide(Decision::reject(ascii_reply(&r)), now);
            self.end_transaction();
        }
    }

    fn reset_session_facts(&mut self) {
        self.facts.helo = None;
        self.facts.auth = None;
        self.clear_transaction_facts();
        self.state.clear(&self.prog, Scope::Transaction);
    }

    fn clear_transaction_facts(&mut self) {
        self.facts.sender = None;
        self.facts.mail_size = 0;
        self.facts.mail_body = String::new();
        self.facts.smtputf8 = false;
        self.facts.dsn_ret = String::new();
        self.facts.dsn_envid = String::new();
        self.facts.recipient = None;
        self.facts.recipients.clear();
        self.facts.message = None;
    }

    fn end_transaction(&mut self) {
        self.sender_auth.end_transaction();
        self.clear_transaction_facts();
        self.state.clear(&self.prog, Scope::Transaction);
        self.tx = Tx::default();
    }

    /// The client is in the server's `networks` (loopback when none is declared): the one
    /// trusted-network test, for the relay rule and for signing.
    fn trusted_client(&self) -> bool {
        use mailpolicy_lang::ir::ListKind;
        match self.prog.server.networks.and_then(|id| self.prog.lists.get(id.index())) {
            Some(l) if l.kind == ListKind::Cidr => l.nets.iter().any(|n| n.contains(self.facts.client_ip)),
            _ => self.facts.client_ip.is_loopback(),
        }
    }

    fn relay_allowed(&self) -> bool {
        if self.session.authenticated().is_some() && self.facts.auth.is_some() || self.relay_session {
            return true;
        }
        let list = |id: Option<mailpolicy_lang::ir::ListId>| id.and_then(|id| self.prog.lists.get(id.index()));
        if self.trusted_client() {
            return true;
        }
        let address = self.facts.recipient.as_ref().map(|r| r.address.as_str()).unwrap_or("");
        let domain = mailpolicy_stdlib::address::split(address).1;
        if domain.is_empty() {
            return true; // <postmaster> and local-only names
        }
        let local = self.facts.local_domains.iter().any(|p| mailpolicy_stdlib::address::domain_matches(p, &domain));
        // Domains the server relays for (Postfix relay_domains, R14).
        local
            || list(self.prog.server.relay_domains)
                .is_some_and(|l| l.items.iter().any(|p| mailpolicy_stdlib::address::domain_matches(p, &domain)))
    }

    /// The record of this session so far, as a message queued now would carry it.
    pub fn session_record(&self) -> SessionRecord {
        let tls = self.facts.tls.clone().unwrap_or_default();
        SessionRecord {
            client_port: self.facts.client_port,
            client_name: self.facts.client_name.clone(),
            client_ptr: self.facts.client_ptr.clone(),
            local_ip: self.facts.local_ip.to_string(),
            local_port: self.facts.local_port,
            listener: self.facts.listener.clone(),
            session_id: self.facts.session_id.clone(),
            tls_version: tls.version,
            tls_cipher: tls.cipher,
            tls_client_cert: tls.client_cert,
            tls_client_fingerprint: tls.client_fingerprint,
            helo_extended: self.facts.helo.as_ref().is_some_and(|h| h.1),
            auth_mechanism: self.facts.auth.as_ref().map(|a| a.1.clone()).unwrap_or_default(),
            mail_size: self.facts.mail_size,
            mail_body: self.facts.mail_body.clone(),
            smtputf8: self.facts.smtputf8,
            vars: self.state.vars.clone(),
            dnsbl_hit: self.state.dnsbl_hit.clone(),
            local_domains: self.facts.local_domains.clone(),
            sender_auth: self.sender_auth.words(),
        }
    }
}

/// Reply text is ASCII (RFC 5321 4.2): other characters, e.g. from an interpolated
/// peer-supplied name, are sent as `?`.
fn ascii_reply(r: &Reply) -> Reply {
    let text: String = r.text.chars().map(|ch| if ch.is_ascii() { ch } else { '?' }).collect();
    Reply { code: r.code, enhanced: r.enhanced, text }
}

fn tls_facts(info: &TlsInfo) -> TlsFacts {
    TlsFacts {
        version: info.version.clone(),
        cipher: info.cipher.clone(),
        client_cert: info.peer_certificate.is_some(),
        client_fingerprint: info.peer_certificate.as_ref().map(|c| fingerprint(c)).unwrap_or_default(),
    }
}

/// The client certificate's SHA-256 fingerprint. A host that already hashed the
/// certificate (or a transcript fixture) passes the 32-byte digest itself.
fn fingerprint(cert: &[u8]) -> String {
    if cert.len() == 32 {
        cert.iter().map(|b| format!("{b:02X}")).collect::<Vec<_>>().join(":")
    } else {
        mailpolicy_stdlib::digest::sha256_fingerprint(cert)
    }
}

/// The server's local domains: the policy's `local_domains` list, else its host name and
/// `localhost`.
pub fn local_domains(prog: &Program, hostname: &str) -> Vec<String> {
    match prog.server.local_domains {
        Some(id) => prog.lists.get(id.index()).map(|l| l.items.clone()).unwrap_or_default(),
        None => vec![hostname.to_ascii_lowercase(), "localhost".into()],
    }
}

/// IPv4-mapped IPv6 addresses as IPv4.
pub fn canonical(ip: std::net::IpAddr) -> std::net::IpAddr {
    canonical_ip(ip)
}

fn canonical_ip(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip {
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map(std::net::IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}
