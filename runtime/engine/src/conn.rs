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
    Answer, Effect, Facts, MessageFacts, Outcome, RcptFacts, RenderedReply, Request, Run, State, Step, TlsFacts,
    Verdict,
};
use crate::smtp::{self, Decision, Event, ForwardPath, PeerInfo, Reply, ReversePath, Session, Time, TlsInfo};

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

mod login;
mod milter;
mod sender_auth;
pub use login::SaslResult;
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
        }
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
                    match run.step(&self.prog, &self.facts, &mut self.state) {
                        Step::Need(Request::Auth(check)) => {
                            if let Some(a) = self.sender_auth_request(check) {
                                if let HostWait::Stage { run, .. } = &mut self.pending {
                                    run.answer(Request::Auth(check), a);
                                }
                            }
                        }
                        Step::Need(r) => return Some(Need::Policy(r)),
                        Step::Done(v) => {
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

    /// The host could not store the message (disk full ...): 452 4.3.1 by default.
    pub fn queue_failed(&mut self, reply: Option<RenderedReply>, now: Time) {
        if matches!(self.pending, HostWait::Queue(_)) {
            self.pending = HostWait::None;
            let r = reply.unwrap_or(RenderedReply {
                code: 452,
                enhanced: (4, 3, 1),
                text: "Insufficient system storage".into(),
            });
            let _ = self.session.decide(Decision::reject(to_reply(&r)), now);
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

    fn run_stage(&mut self, stage: Stage, event: Event) {
        self.pending = HostWait::Stage { run: Run::new(&self.prog, stage), event };
    }

    fn on_event(&mut self, ev: Event, now: Time) -> Option<Need> {
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

    fn accepted_addresses(&self) -> Vec<String> {
        self.tx.rcpts.iter().map(|r| r.rcpt.address.clone()).collect()
    }

    fn rcpt_record(&self) -> QueuedRcpt {
        let r = self.facts.recipient.clone().unwrap_or_default();
        QueuedRcpt {
            address: r.address,
            notify: r.notify,
            orcpt: r.orcpt,
            batv_tagged: r.batv_tagged.unwrap_or_default(),
        }
    }

    fn finish_stage(&mut self, stage: Stage, event: Event, mut v: Verdict, now: Time) {
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
                self.notes.push_back(Need::Note(Note::Log(format!("warn_only: would answer {r}"))));
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
            v.outcome =
                Outcome::Reject(RenderedReply { code: 554, enhanced: (5, 7, 1), text: "Relay access denied".into() });
        }
        let outcome_text = match &v.outcome {
            Outcome::Default => "default".to_string(),
            Outcome::Accept => "accept".to_string(),
            Outcome::Reject(r) => format!("reject {r}"),
            Outcome::Tempfail(r) => format!("tempfail {r}"),
            Outcome::Discard => "discard".to_string(),
            Outcome::Deliver(t) => format!("deliver {t}"),
        };
        self.notes.push_back(Need::Note(Note::Verdict {
            stage,
            outcome: outcome_text,
            rule: v.decided_by,
            trace: v.trace.clone(),
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
                        Effect::Log(t) => self.notes.push_back(Need::Note(Note::Log(t.clone()))),
                        Effect::Alert { to, text, every_ms } => self.notes.push_back(Need::Note(Note::Alert {
                            to: to.clone(),
                            text: text.clone(),
                            every_ms: *every_ms,
                        })),
                        Effect::Tarpit(ms) => delay += Duration::from_millis(*ms),
                        _ => {}
                    }
                }
                let mut d = Decision::accept().with_delay(delay);
                if let Outcome::Reject(r) | Outcome::Tempfail(r) = &v.outcome {
                    if r.code == 421 {
                        d = Decision::reject(to_reply(r)).with_close();
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
                Effect::Log(t) => self.notes.push_back(Need::Note(Note::Log(t.clone()))),
                Effect::Alert { to, text, every_ms } => self.notes.push_back(Need::Note(Note::Alert {
                    to: to.clone(),
                    text: text.clone(),
                    every_ms: *every_ms,
                })),
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
                _ => RenderedReply { code: 550, enhanced: (5, 7, 1), text: "Rejected".into() },
            };
            let close = r.code == 421 || r.code == 521;
            let mut d = Decision::reject(to_reply(&r)).with_delay(delay);
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
    fn defer(&mut self, d: Decision, _now: Time) {
        self.deferred = Some(d);
    }

    fn apply_tx_effects(&mut self, effects: &[Effect]) {
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
        }
    }

    /// Apply header changes and prepend the Received: header, inside the header section
    /// only ([`crate::headers`]: the boundary as a parser finds it, any line-ending style).
    fn edit_message(&self, data: &[u8]) -> (Vec<u8>, Vec<(String, String)>) {
        use crate::headers::Edit;
        let mut added = Vec::new();
        let mut edits = Vec::new();
        for e in &self.tx.headers {
            match e {
                Effect::HeaderAdd { name, value } => {
                    edits.push(Edit::Add(name.clone(), value.clone()));
                    added.push((name.clone(), value.clone()));
                }
                Effect::HeaderRemove(name) => edits.push(Edit::Remove(name.clone())),
                Effect::HeaderAppend { name, value } => {
                    edits.push(Edit::Append(name.clone(), value.clone()));
                    added.push((name.clone(), value.clone()));
                }
                Effect::HeaderInsert { index, name, value } => {
                    edits.push(Edit::Insert(*index, name.clone(), value.clone()));
                    added.push((name.clone(), value.clone()));
                }
                Effect::HeaderChange { index, name, value } => {
                    edits.push(Edit::Change(*index, name.clone(), value.clone()))
                }
                Effect::HeaderReplace { name, value } => {
                    edits.push(Edit::Replace(name.clone(), value.clone()));
                    added.push((name.clone(), value.clone()));
                }
                _ => {}
            }
        }
        (crate::headers::edit(data, &self.received_header(), &edits), added)
    }

    fn received_header(&self) -> String {
        let helo = self.facts.helo.as_ref().map(|h| h.0.as_str()).unwrap_or("unknown");
        let hostname = &self.session.config().hostname;
        let proto = match (
            self.facts.helo.as_ref().is_some_and(|h| h.1),
            self.facts.tls.is_some(),
            self.facts.auth.is_some(),
        ) {
            (false, _, _) => "SMTP",
            (true, false, false) => "ESMTP",
            (true, true, false) => "ESMTPS",
            (true, false, true) => "ESMTPA",
            (true, true, true) => "ESMTPSA",
        };
        let clean = |s: &str| s.chars().filter(|c| !c.is_control() && *c != '(' && *c != ')').collect::<String>();
        format!(
            "Received: from {} ({} [{}])\r\n\tby {} (mailpolicy) with {}; {}\r\n",
            clean(helo),
            clean(&self.facts.client_name),
            self.facts.client_ip,
            hostname,
            proto,
            crate::date::rfc2822(self.facts.now_ms)
        )
    }
}

/// `field` (with or without its CRLF) on top of `data`.
fn prepend_field(field: &str, data: &[u8]) -> Vec<u8> {
    let f = field.trim_end_matches(['\r', '\n']);
    let mut out = Vec::with_capacity(f.len() + 2 + data.len());
    if !f.is_empty() && f.contains(':') {
        out.extend_from_slice(f.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(data);
    out
}

/// Reply text is ASCII (RFC 5321 4.2): other characters, e.g. from an interpolated
/// peer-supplied name, are sent as `?`.
fn to_reply(r: &RenderedReply) -> Reply {
    let (a, b, c) = r.enhanced;
    let text: String = r.text.chars().map(|ch| if ch.is_ascii() { ch } else { '?' }).collect();
    Reply::new(r.code, (a as u8, b, c), text)
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
