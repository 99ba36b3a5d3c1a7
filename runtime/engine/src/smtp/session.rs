//! The ESMTP server session state machine. See the module docs of
//! [`crate::smtp`] for the contract.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine as _;

use super::address::{parse_forward_path, parse_reverse_path, split_path, ForwardPath, PathError, ReversePath};
use super::data::{ContentChecker, ContentFlags, DotReceiver};
use super::params::{parse_mail_params, parse_rcpt_params, BodyType, MailParams, Offered, ParamError, RcptParams};
use super::reply::Reply;
use super::time::Time;

mod commands;

/// SASL data: strict standard base64 (RFC 4648, canonical padding, no stray bits, no
/// white space), as RFC 4954 requires.
pub(super) const BASE64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// Which ESMTP extensions the server offers in its EHLO reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Extensions {
    /// RFC 2920.
    pub pipelining: bool,
    /// RFC 1870; advertises `SIZE max_message_size`.
    pub size: bool,
    /// RFC 6152.
    pub eight_bit_mime: bool,
    /// RFC 6531.
    pub smtputf8: bool,
    /// RFC 2034. When off, enhanced codes are stripped from every reply.
    pub enhanced_status_codes: bool,
    /// RFC 3461.
    pub dsn: bool,
    /// RFC 3030 BDAT.
    pub chunking: bool,
    /// RFC 3030 BINARYMIME (only offered together with CHUNKING).
    pub binary_mime: bool,
    /// RFC 3207; offered only when [`Config::tls_available`] and TLS is not active.
    pub starttls: bool,
}

impl Default for Extensions {
    fn default() -> Self {
        Extensions {
            pipelining: true,
            size: true,
            eight_bit_mime: true,
            smtputf8: true,
            enhanced_status_codes: true,
            dsn: true,
            chunking: true,
            binary_mime: true,
            starttls: true,
        }
    }
}

/// Engine configuration. `Default` gives RFC-sane, Postfix-like values.
#[derive(Clone, Debug)]
pub struct Config {
    /// Our host name, used in the banner, EHLO and QUIT replies.
    pub hostname: String,
    /// Banner text after the host name: `220 <hostname> <greeting>`.
    pub greeting: String,
    /// Longest command line, CRLF included (RFC 5321 4.5.3.1.4: 512).
    pub max_command_line: usize,
    /// Longest AUTH command or SASL response line (RFC 4954 4: 12288).
    pub max_auth_line: usize,
    /// Bytes of a message held in memory past its header section (0: all of it); the rest
    /// is handed to the host as it arrives ([`Session::take_spill`]).
    pub max_in_memory: u64,
    /// Message text line length, CRLF included, past which a line counts as long (RFC 5321
    /// 4.5.3.1.6: 1000). Long lines are accepted; only `max_message_size` bounds them.
    pub max_text_line: usize,
    /// Most accepted recipients per transaction; more get `452 4.5.3`.
    pub max_recipients: usize,
    /// Largest message in octets (0 = unlimited); advertised with SIZE.
    pub max_message_size: u64,
    /// Largest header section in octets (0 = unlimited).
    pub max_header_size: u64,
    /// Most bytes buffered while the engine waits for the host (pipelined
    /// input, BDAT chunks). Hosts should read no more than
    /// [`Session::input_room`]; input beyond it ends the session with 421.
    pub max_input_buffer: usize,
    /// Offered extensions.
    pub extensions: Extensions,
    /// The host can do TLS on this connection (STARTTLS is offered).
    pub tls_available: bool,
    /// SASL mechanisms the host implements, e.g. `["PLAIN", "LOGIN"]`.
    /// Empty: AUTH is not offered.
    pub auth_mechanisms: Vec<String>,
    /// Offer AUTH only under TLS (default true). AUTH before TLS then gets
    /// `530 5.7.0 Must issue a STARTTLS command first`.
    pub auth_requires_tls: bool,
    /// VRFY goes to the host as [`Event::Vrfy`]; otherwise `252 2.5.2`.
    pub vrfy_enabled: bool,
    /// EXPN goes to the host as [`Event::Expn`]; otherwise `502 5.5.1`.
    pub expn_enabled: bool,
    /// After this many error replies, each further error reply is delayed by
    /// `error_sleep` (Postfix `smtpd_soft_error_limit`, 10).
    pub soft_error_limit: u32,
    /// At this many error replies the session says `421 4.7.0` and closes
    /// (Postfix `smtpd_hard_error_limit`, 20).
    pub hard_error_limit: u32,
    /// Delay of error replies past the soft limit (1 s).
    pub error_sleep: Duration,
    /// Hold the banner this long after connect (0 = none).
    pub greet_pause: Duration,
    /// Input before the banner gets `554 5.5.1` and a close (default true).
    pub reject_talk_first: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            hostname: "localhost".into(),
            greeting: "ESMTP mailpolicy".into(),
            max_command_line: 512,
            max_auth_line: 12288,
            max_text_line: 1000,
            max_in_memory: 0,
            max_recipients: 100,
            max_message_size: 10_240_000,
            max_header_size: 102_400,
            max_input_buffer: 256 * 1024,
            extensions: Extensions::default(),
            tls_available: false,
            auth_mechanisms: Vec::new(),
            auth_requires_tls: true,
            vrfy_enabled: false,
            expn_enabled: false,
            soft_error_limit: 10,
            hard_error_limit: 20,
            error_sleep: Duration::from_secs(1),
            greet_pause: Duration::ZERO,
            reject_talk_first: true,
        }
    }
}

/// TLS parameters reported by the host after a handshake.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsInfo {
    /// e.g. `TLSv1.3`.
    pub version: String,
    /// e.g. `TLS13_AES_256_GCM_SHA384`.
    pub cipher: String,
    /// Server name the client asked for.
    pub sni: Option<String>,
    /// DER of the client certificate, when one was presented and verified.
    pub peer_certificate: Option<Vec<u8>>,
}

/// What the host knows about the connection.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerInfo {
    /// Client address.
    pub remote: Option<SocketAddr>,
    /// Our address.
    pub local: Option<SocketAddr>,
    /// Set for implicit TLS (port 465): TLS is active from the start.
    pub tls: Option<TlsInfo>,
}

/// One recipient of a transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recipient {
    /// The forward path.
    pub path: ForwardPath,
    /// Its parameters.
    pub params: RcptParams,
}

/// The envelope of a finished message: sender and accepted recipients.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Envelope {
    /// MAIL FROM path.
    pub from: ReversePath,
    /// MAIL FROM parameters.
    pub params: MailParams,
    /// Recipients whose RCPT decision accepted them, in order.
    pub recipients: Vec<Recipient>,
}

/// What the engine reports to the host. Events marked *decide* block the
/// session until the host answers; the others are informational.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// *decide*: a client connected; accept sends the banner.
    Connect,
    /// *decide*: HELO (`extended == false`) or EHLO.
    Helo {
        /// The argument, as sent.
        name: String,
        /// EHLO.
        extended: bool,
    },
    /// *decide*: MAIL FROM; accept opens the transaction.
    Mail {
        /// Sender.
        from: ReversePath,
        /// Parameters.
        params: MailParams,
    },
    /// *decide*: RCPT TO; accept adds the recipient.
    Rcpt {
        /// Recipient.
        to: ForwardPath,
        /// Parameters.
        params: RcptParams,
    },
    /// *decide*: DATA (before `354`), or the first BDAT of a transaction
    /// (`chunked`, before its chunk is read; a rejection discards the chunk
    /// and ends the transaction).
    Data {
        /// BDAT rather than DATA.
        chunked: bool,
    },
    /// *decide*: the complete message. Accept replies `250 2.0.0 Queued as
    /// <queue_id>`; answer only once the message is durable. The
    /// transaction ends with this decision either way.
    Message {
        /// Sender, parameters, accepted recipients.
        envelope: Envelope,
        /// The message exactly as received: dot-unstuffed, CRLF line ends,
        /// without the terminating `.CRLF`.
        data: Vec<u8>,
        /// Received with BDAT.
        chunked: bool,
        /// Bytes that followed `data` and went to the host through
        /// [`Session::take_spill`] (0 when the whole message is in `data`).
        spilled: u64,
    },
    /// *decide*: VRFY (only when [`Config::vrfy_enabled`]).
    Vrfy {
        /// The argument.
        arg: String,
    },
    /// *decide*: EXPN (only when [`Config::expn_enabled`]).
    Expn {
        /// The argument.
        arg: String,
    },
    /// *answer with [`Session::auth_continue`] or [`Session::auth_done`]*:
    /// one SASL step. `data` is the base64-decoded client data; `None` when
    /// AUTH had no initial response (`=` gives `Some(vec![])`).
    AuthStep {
        /// Mechanism, upper case, as configured.
        mechanism: String,
        /// Decoded client response.
        data: Option<Vec<u8>>,
    },
    /// Informational: the client cancelled the SASL exchange or sent bad
    /// base64; drop the SASL state.
    AuthCancelled,
    /// *decide*: SASL succeeded for `user`; the policy's auth stage decides.
    /// Accept replies `235 2.7.0` and marks the session authenticated.
    Auth {
        /// Mechanism.
        mechanism: String,
        /// Authenticated identity from [`AuthOutcome::Success`].
        user: String,
    },
    /// *decide*: a SASL exchange failed; the policy's auth stage runs for it. The reply
    /// is the failure's (`535 5.7.8` unless the host gave another) whatever the decision,
    /// except that a decision that closes (421) closes; its delay holds the reply. The
    /// session stays unauthenticated either way.
    AuthFailed {
        /// Mechanism tried.
        mechanism: String,
    },
    /// *answer with [`Session::tls_established`] (or close)*: the engine
    /// queued `220 2.0.0 Ready to start TLS`; flush it, then handshake.
    StartTls,
    /// Informational: the transaction was discarded (RSET, HELO/EHLO,
    /// STARTTLS, or a rejected first BDAT).
    Reset,
    /// Informational: QUIT received; `221` queued, the session closes.
    Quit,
    /// Informational: the session is closed; flush `poll_transmit`, then
    /// close the socket. Always the last event.
    Closed,
}

impl Event {
    /// True when the session waits for [`Session::decide`] (or, for
    /// `AuthStep`/`StartTls`, the matching method) after this event.
    pub fn needs_answer(&self) -> bool {
        !matches!(self, Event::AuthCancelled | Event::Reset | Event::Quit | Event::Closed)
    }
}

/// The host's answer to a *decide* event.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Decision {
    /// Whether the item is accepted (a recipient counts only if accepted).
    pub accept: bool,
    /// Reply to send instead of the engine's standard one.
    pub reply: Option<Reply>,
    /// Close the connection after the reply.
    pub close: bool,
    /// Hold the reply (and all further processing) this long (tarpit).
    pub delay: Duration,
    /// Queue id for the `250 2.0.0 Queued as <id>` reply to a message.
    pub queue_id: Option<String>,
}

impl Decision {
    /// Accept with the standard reply.
    pub fn accept() -> Decision {
        Decision { accept: true, ..Decision::default() }
    }
    /// Accept a message with its queue id.
    pub fn queued(id: impl Into<String>) -> Decision {
        Decision { accept: true, queue_id: Some(id.into()), ..Decision::default() }
    }
    /// Reject with `reply` (4xx or 5xx).
    pub fn reject(reply: Reply) -> Decision {
        Decision { accept: false, reply: Some(reply), ..Decision::default() }
    }
    /// Set the reply.
    pub fn with_reply(mut self, reply: Reply) -> Decision {
        self.reply = Some(reply);
        self
    }
    /// Close after replying.
    pub fn with_close(mut self) -> Decision {
        self.close = true;
        self
    }
    /// Delay the reply.
    pub fn with_delay(mut self, delay: Duration) -> Decision {
        self.delay = delay;
        self
    }
}

/// Result of a SASL exchange, for [`Session::auth_done`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuthOutcome {
    /// Credentials valid for `user`; the engine emits [`Event::Auth`].
    Success {
        /// Authenticated identity.
        user: String,
    },
    /// Credentials invalid; `reply` defaults to `535 5.7.8`.
    Failure {
        /// Reply to send.
        reply: Option<Reply>,
    },
}

/// A host call that does not fit the session state (a host bug).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UsageError {
    /// No answer is awaited.
    NotWaiting,
    /// An answer is awaited, but of another kind (e.g. `decide` during a
    /// SASL step).
    WrongAnswer,
    /// The session is closed.
    Closed,
}

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            UsageError::NotWaiting => "no answer is awaited",
            UsageError::WrongAnswer => "another kind of answer is awaited",
            UsageError::Closed => "session closed",
        })
    }
}

impl std::error::Error for UsageError {}

#[derive(Clone, Debug)]
enum Awaiting {
    Connect,
    Helo { name: String, extended: bool },
    Mail { from: ReversePath, params: MailParams },
    Rcpt { to: ForwardPath, params: RcptParams },
    Data { bdat: Option<(u64, bool)> },
    Message,
    Vrfy,
    Expn,
    AuthStep { mechanism: String },
    Auth { mechanism: String, user: String },
    AuthFailed { reply: Reply },
}

#[derive(Debug)]
enum BdatSink {
    Store,
    Discard { reply: Reply, delay: Duration, close: bool },
}

#[derive(Debug)]
enum Receiving {
    Greeting,
    Command,
    Data(Box<DotReceiver>),
    Bdat { remaining: u64, last: bool, sink: BdatSink },
    AuthResponse { mechanism: String },
    WaitTls,
    Closed,
}

#[derive(Debug)]
struct Transaction {
    from: ReversePath,
    params: MailParams,
    recipients: Vec<Recipient>,
    bdat: Option<ContentChecker>,
}

/// Received, not yet processed input. Consuming advances an offset, so a
/// long pipelined buffer costs O(n), not O(n^2) memmoves.
#[derive(Debug, Default)]
struct InBuf {
    buf: Vec<u8>,
    pos: usize,
}

impl InBuf {
    fn unread(&self) -> &[u8] {
        self.buf.get(self.pos..).unwrap_or(&[])
    }
    fn len(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }
    fn consume(&mut self, n: usize) {
        self.pos = self.pos.saturating_add(n).min(self.buf.len());
        if self.pos == self.buf.len() {
            self.clear();
        }
    }
    fn clear(&mut self) {
        self.buf.clear();
        self.pos = 0;
    }
    fn extend_from_slice(&mut self, bytes: &[u8]) {
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.extend_from_slice(bytes);
    }
}

#[derive(Debug)]
struct Held {
    until: Time,
    bytes: Vec<u8>,
    close: bool,
}

/// One SMTP server session. See the [module docs](crate::smtp).
#[derive(Debug)]
pub struct Session {
    /// Messages started (DATA or first BDAT), numbering the spill.
    message_seq: u64,
    /// Spilled bytes of a message that ended, not yet taken by the host.
    spill_out: Vec<u8>,
    config: Config,
    peer: PeerInfo,
    tls: Option<TlsInfo>,
    phase: Receiving,
    pending: Option<Awaiting>,
    held: Option<Held>,
    input: InBuf,
    discarding_line: bool,
    overflow: bool,
    out: Vec<u8>,
    events: VecDeque<Event>,
    helo: Option<(String, bool)>,
    tx: Option<Transaction>,
    auth: Option<(String, String)>,
    rejected_at_connect: bool,
    errors: u32,
    greet_at: Time,
    closed_emitted: bool,
}

fn r(code: u16, e: (u8, u16, u16), text: &str) -> Reply {
    Reply::new(code, e, text)
}

impl Session {
    /// Starts a session; the first event is [`Event::Connect`].
    pub fn new(config: Config, peer: PeerInfo, now: Time) -> Session {
        let greet_at = now + config.greet_pause;
        let tls = peer.tls.clone();
        let mut events = VecDeque::new();
        events.push_back(Event::Connect);
        Session {
            message_seq: 0,
            spill_out: Vec::new(),
            config,
            peer,
            tls,
            phase: Receiving::Greeting,
            pending: Some(Awaiting::Connect),
            held: None,
            input: InBuf::default(),
            discarding_line: false,
            overflow: false,
            out: Vec::new(),
            events,
            helo: None,
            tx: None,
            auth: None,
            rejected_at_connect: false,
            errors: 0,
            greet_at,
            closed_emitted: false,
        }
    }

    // ----- accessors -------------------------------------------------------

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }
    /// Peer information given at creation.
    pub fn peer(&self) -> &PeerInfo {
        &self.peer
    }
    /// Active TLS parameters.
    pub fn tls(&self) -> Option<&TlsInfo> {
        self.tls.as_ref()
    }
    /// Accepted HELO/EHLO name and whether it was EHLO.
    pub fn helo(&self) -> Option<(&str, bool)> {
        self.helo.as_ref().map(|(n, e)| (n.as_str(), *e))
    }
    /// The host vouches for the client's identity before any command: a local submission
    /// (`mailc sendmail`), whose user the operating system named. The session is
    /// authenticated as after an accepted AUTH with `mechanism`; AUTH is not offered again.
    pub fn preauthenticate(&mut self, mechanism: &str, user: &str) {
        self.auth = Some((mechanism.to_string(), user.to_string()));
    }

    /// `(mechanism, user)` after an accepted AUTH.
    pub fn authenticated(&self) -> Option<(&str, &str)> {
        self.auth.as_ref().map(|(m, u)| (m.as_str(), u.as_str()))
    }
    /// Error replies counted so far.
    pub fn error_count(&self) -> u32 {
        self.errors
    }
    /// True once the session is over: flush [`poll_transmit`](Self::poll_transmit), then close.
    /// The client is sending message content (inside DATA or a BDAT chunk): hosts apply
    /// their data-phase idle time-out instead of the command one.
    pub fn in_message(&self) -> bool {
        matches!(self.phase, Receiving::Data(_) | Receiving::Bdat { .. })
    }

    pub fn is_closed(&self) -> bool {
        matches!(self.phase, Receiving::Closed)
    }
    /// Input is buffered that does not make a whole command line yet: hosts time a
    /// request from its first byte (a per-request deadline), not only the idle gaps.
    /// Message bytes past the part held in memory (`Config::max_in_memory`), in order, and
    /// the number of the message they belong to: the host appends them to that message's
    /// spill file as they come (call after every `handle_input`). The message's
    /// [`Event::Message`] carries the in-memory part and how many bytes were spilled.
    pub fn take_spill(&mut self) -> Option<(u64, Vec<u8>)> {
        let mut out = std::mem::take(&mut self.spill_out);
        match &mut self.phase {
            Receiving::Data(rx) => out.extend_from_slice(&rx.content.take_spill()),
            _ => {
                if let Some(c) = self.tx.as_mut().and_then(|t| t.bdat.as_mut()) {
                    out.extend_from_slice(&c.take_spill());
                }
            }
        }
        (!out.is_empty()).then_some((self.message_seq, out))
    }

    /// A message is being received or waits for its decision (DATA, BDAT chunks so far,
    /// or the final `Event::Message` not yet decided): its spill is still needed.
    pub fn message_open(&self) -> bool {
        self.in_message()
            || self.tx.as_ref().is_some_and(|t| t.bdat.is_some())
            || matches!(self.pending, Some(Awaiting::Message))
    }

    pub fn partial_input(&self) -> bool {
        self.input.len() > 0
    }
    /// True while an event awaits the host's answer.
    pub fn is_waiting(&self) -> bool {
        self.pending.is_some() || matches!(self.phase, Receiving::WaitTls)
    }
    /// How many more input bytes the engine will buffer now. Hosts should
    /// read at most this many (backpressure while a decision is pending).
    pub fn input_room(&self) -> usize {
        if self.is_closed() {
            return 0;
        }
        self.config.max_input_buffer.saturating_sub(self.input.len())
    }

    // ----- output ----------------------------------------------------------

    /// Bytes to write to the client, if any.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        if self.out.is_empty() {
            None
        } else {
            Some(std::mem::take(&mut self.out))
        }
    }

    /// Next event for the host.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) must be called next
    /// (greet pause, tarpit or error-sleep delays). `None`: no timer.
    /// Idle timeouts are the host's business (see [`shutdown`](Self::shutdown)).
    pub fn poll_timeout(&self) -> Option<Time> {
        self.held.as_ref().map(|h| h.until)
    }

    /// Alias of [`poll_timeout`](Self::poll_timeout).
    pub fn next_timeout(&self) -> Option<Time> {
        self.poll_timeout()
    }

    // ----- input -----------------------------------------------------------

    /// Bytes received from the client.
    pub fn handle_input(&mut self, bytes: &[u8], now: Time) {
        match self.phase {
            Receiving::Closed | Receiving::WaitTls => return,
            Receiving::Greeting if !bytes.is_empty() && self.config.reject_talk_first => {
                self.held = None;
                self.pending = None;
                self.input.clear();
                self.send(
                    r(554, (5, 5, 1), "Protocol error: client sent data before the greeting"),
                    Duration::ZERO,
                    true,
                    now,
                );
                return;
            }
            _ => {}
        }
        let mut rest = bytes;
        loop {
            let room = self.config.max_input_buffer.saturating_sub(self.input.len());
            let take = room.min(rest.len());
            let (now_part, later) = rest.split_at(take);
            self.input.extend_from_slice(now_part);
            rest = later;
            self.drive(now);
            if rest.is_empty() || matches!(self.phase, Receiving::Closed | Receiving::WaitTls) {
                break;
            }
            if self.input.len() >= self.config.max_input_buffer {
                self.overflow = true;
                self.drive(now);
                break;
            }
        }
    }

    /// The clock reached `now`: release held replies whose time has come.
    pub fn handle_timeout(&mut self, now: Time) {
        if let Some(h) = &self.held {
            if now >= h.until {
                if let Some(h) = self.held.take() {
                    self.out.extend_from_slice(&h.bytes);
                    if h.close {
                        self.close_now();
                    } else if matches!(self.phase, Receiving::Greeting) {
                        self.phase = Receiving::Command;
                    }
                }
                self.drive(now);
            }
        }
    }

    /// The client closed its side (EOF) or the connection broke. An
    /// unfinished message is discarded.
    pub fn handle_eof(&mut self, _now: Time) {
        self.held = None;
        self.pending = None;
        self.close_now();
    }

    /// The host ends the session (idle timeout, shutdown): sends `reply`
    /// (default `421 4.3.2 Service shutting down`) and closes. Awaiting
    /// decisions and held replies are dropped.
    pub fn shutdown(&mut self, reply: Option<Reply>, now: Time) {
        if self.is_closed() {
            return;
        }
        self.held = None;
        self.pending = None;
        let reply = reply.unwrap_or_else(|| r(421, (4, 3, 2), "Service shutting down"));
        self.send(reply, Duration::ZERO, true, now);
    }

    // ----- host answers ----------------------------------------------------

    /// Answers the pending *decide* event.
    pub fn decide(&mut self, d: Decision, now: Time) -> Result<(), UsageError> {
        if self.is_closed() {
            return Err(UsageError::Closed);
        }
        let pending = match self.pending.take() {
            None => return Err(UsageError::NotWaiting),
            Some(p @ Awaiting::AuthStep { .. }) => {
                self.pending = Some(p);
                return Err(UsageError::WrongAnswer);
            }
            Some(p) => p,
        };
        let custom = d.reply.clone();
        let reply_or = |default: Reply| custom.clone().unwrap_or(default);
        let mut delay = d.delay;
        let reply = match pending {
            Awaiting::Connect => {
                delay = delay.max(self.greet_at - now);
                if d.accept {
                    let text = format!("{} {}", self.config.hostname, self.config.greeting);
                    reply_or(Reply::plain(220, text.trim_end()))
                } else {
                    if !d.close {
                        self.rejected_at_connect = true;
                    }
                    reply_or(r(554, (5, 7, 1), "Access denied"))
                }
            }
            Awaiting::Helo { name, extended } => {
                if d.accept {
                    let first = custom
                        .as_ref()
                        .map(|c| c.text.clone())
                        .unwrap_or_else(|| format!("{} Hello {}", self.config.hostname, name));
                    self.helo = Some((name, extended));
                    if extended {
                        self.ehlo_reply(first)
                    } else {
                        Reply::plain(250, first)
                    }
                } else {
                    self.helo = None;
                    reply_or(r(550, (5, 7, 1), "HELO rejected"))
                }
            }
            Awaiting::Mail { from, params } => {
                if d.accept {
                    self.tx = Some(Transaction { from, params, recipients: Vec::new(), bdat: None });
                    reply_or(r(250, (2, 1, 0), "Sender OK"))
                } else {
                    reply_or(r(550, (5, 7, 1), "Sender rejected"))
                }
            }
            Awaiting::Rcpt { to, params } => {
                if d.accept {
                    if let Some(tx) = self.tx.as_mut() {
                        tx.recipients.push(Recipient { path: to, params });
                    }
                    reply_or(r(250, (2, 1, 5), "Recipient OK"))
                } else {
                    reply_or(r(550, (5, 7, 1), "Recipient rejected"))
                }
            }
            Awaiting::Data { bdat: None } => {
                if d.accept {
                    let checker = self.new_checker();
                    self.phase = Receiving::Data(Box::new(DotReceiver::new(checker)));
                    reply_or(Reply::plain(354, "End data with <CR><LF>.<CR><LF>"))
                } else {
                    reply_or(r(554, (5, 7, 1), "Data rejected"))
                }
            }
            Awaiting::Data { bdat: Some((size, last)) } => {
                let sink = if d.accept {
                    let checker = self.new_checker();
                    if let Some(tx) = self.tx.as_mut() {
                        tx.bdat = Some(checker);
                    }
                    BdatSink::Store
                } else {
                    self.reset_tx();
                    BdatSink::Discard {
                        reply: reply_or(r(554, (5, 7, 1), "Data rejected")),
                        delay: d.delay,
                        close: d.close,
                    }
                };
                self.phase = Receiving::Bdat { remaining: size, last, sink };
                self.drive(now);
                return Ok(());
            }
            Awaiting::Message => {
                if d.accept {
                    self.errors = 0;
                    let text = match &d.queue_id {
                        Some(id) => format!("Queued as {id}"),
                        None => "Message accepted".to_string(),
                    };
                    reply_or(r(250, (2, 0, 0), &text))
                } else {
                    reply_or(r(550, (5, 7, 1), "Message rejected"))
                }
            }
            Awaiting::Vrfy => reply_or(if d.accept {
                r(252, (2, 5, 2), "Cannot VRFY user, but will accept message and attempt delivery")
            } else {
                r(550, (5, 7, 1), "Access denied")
            }),
            Awaiting::Expn => reply_or(if d.accept {
                r(502, (5, 5, 1), "EXPN not available")
            } else {
                r(550, (5, 7, 1), "Access denied")
            }),
            Awaiting::Auth { mechanism, user } => {
                if d.accept {
                    self.auth = Some((mechanism, user));
                    reply_or(r(235, (2, 7, 0), "Authentication successful"))
                } else {
                    reply_or(r(535, (5, 7, 8), "Authentication credentials invalid"))
                }
            }
            Awaiting::AuthFailed { reply } => match custom.filter(|c| d.close && c.code / 100 == 4) {
                Some(c) => c,
                None => reply,
            },
            Awaiting::AuthStep { .. } => return Err(UsageError::WrongAnswer),
        };
        self.send(reply, delay, d.close, now);
        self.drive(now);
        Ok(())
    }

    /// Answers [`Event::AuthStep`] with a server challenge (`334 <base64>`).
    pub fn auth_continue(&mut self, challenge: &[u8], now: Time) -> Result<(), UsageError> {
        let mechanism = self.take_auth_step()?;
        self.phase = Receiving::AuthResponse { mechanism };
        self.out.extend_from_slice(b"334 ");
        self.out.extend_from_slice(BASE64.encode(challenge).as_bytes());
        self.out.extend_from_slice(b"\r\n");
        self.drive(now);
        Ok(())
    }

    /// Answers [`Event::AuthStep`] with the end of the SASL exchange.
    pub fn auth_done(&mut self, outcome: AuthOutcome, now: Time) -> Result<(), UsageError> {
        let mechanism = self.take_auth_step()?;
        self.phase = Receiving::Command;
        match outcome {
            AuthOutcome::Success { user } => {
                self.events.push_back(Event::Auth { mechanism: mechanism.clone(), user: user.clone() });
                self.pending = Some(Awaiting::Auth { mechanism, user });
            }
            AuthOutcome::Failure { reply } => {
                let reply = reply.unwrap_or_else(|| r(535, (5, 7, 8), "Authentication credentials invalid"));
                self.events.push_back(Event::AuthFailed { mechanism });
                self.pending = Some(Awaiting::AuthFailed { reply });
                let _ = now;
            }
        }
        Ok(())
    }

    /// Answers [`Event::StartTls`]: the handshake succeeded. The session
    /// restarts as freshly connected under TLS (no banner; the client must
    /// EHLO again; HELO, AUTH and transaction are forgotten).
    pub fn tls_established(&mut self, info: TlsInfo, now: Time) -> Result<(), UsageError> {
        match self.phase {
            Receiving::WaitTls => {}
            Receiving::Closed => return Err(UsageError::Closed),
            _ => return Err(UsageError::NotWaiting),
        }
        self.tls = Some(info);
        self.helo = None;
        self.tx = None;
        self.auth = None;
        self.input.clear();
        self.discarding_line = false;
        self.phase = Receiving::Command;
        self.drive(now);
        Ok(())
    }

    fn take_auth_step(&mut self) -> Result<String, UsageError> {
        if self.is_closed() {
            return Err(UsageError::Closed);
        }
        match self.pending.take() {
            Some(Awaiting::AuthStep { mechanism }) => Ok(mechanism),
            Some(p) => {
                self.pending = Some(p);
                Err(UsageError::WrongAnswer)
            }
            None => Err(UsageError::NotWaiting),
        }
    }

    // ----- internals -------------------------------------------------------

    fn new_checker(&mut self) -> ContentChecker {
        self.message_seq += 1;
        self.spill_out.clear();
        ContentChecker::new(self.config.max_message_size, self.config.max_text_line, self.config.max_header_size)
            .with_keep(self.config.max_in_memory)
    }

    fn close_now(&mut self) {
        self.phase = Receiving::Closed;
        self.input = InBuf::default();
        self.tx = None;
        if !self.closed_emitted {
            self.closed_emitted = true;
            self.events.push_back(Event::Closed);
        }
    }

    fn reset_tx(&mut self) {
        if self.tx.take().is_some() {
            self.events.push_back(Event::Reset);
        }
    }

    /// Queues a reply, counting errors and applying error sleep and the
    /// hard error limit.
    fn send(&mut self, reply: Reply, delay: Duration, close: bool, now: Time) {
        let mut bytes = reply.to_wire(self.config.extensions.enhanced_status_codes);
        let mut delay = delay;
        let mut close = close;
        if reply.is_error() && !close {
            self.errors = self.errors.saturating_add(1);
            // Postfix and sendmail delay the errors *after* the soft limit: with a limit of
            // 3 the fourth error is the first one held.
            if self.errors > self.config.soft_error_limit {
                delay = delay.max(self.config.error_sleep);
            }
            if self.errors >= self.config.hard_error_limit {
                let bye = r(421, (4, 7, 0), &format!("{} Error: too many errors", self.config.hostname));
                bytes.extend_from_slice(&bye.to_wire(self.config.extensions.enhanced_status_codes));
                close = true;
            }
        }
        if delay > Duration::ZERO {
            self.held = Some(Held { until: now + delay, bytes, close });
        } else {
            self.out.extend_from_slice(&bytes);
            if close {
                self.close_now();
            } else if matches!(self.phase, Receiving::Greeting) {
                self.phase = Receiving::Command;
            }
        }
    }

    fn blocked(&self) -> bool {
        self.pending.is_some()
            || self.held.is_some()
            || matches!(self.phase, Receiving::Closed | Receiving::WaitTls | Receiving::Greeting)
    }

    /// Processes buffered input until blocked or out of input.
    fn drive(&mut self, now: Time) {
        while !self.blocked() {
            if self.overflow {
                self.overflow = false;
                self.input.clear();
                self.send(r(421, (4, 7, 0), "Too much pipelined input"), Duration::ZERO, true, now);
                return;
            }
            match &mut self.phase {
                Receiving::Data(rx) => match rx.feed(self.input.unread()) {
                    Some(n) => {
                        self.input.consume(n);
                        let phase = std::mem::replace(&mut self.phase, Receiving::Command);
                        if let Receiving::Data(rx) = phase {
                            self.finish_message(rx.content, false, now);
                        }
                    }
                    None => {
                        self.input.clear();
                        return;
                    }
                },
                Receiving::Bdat { remaining, sink, .. } => {
                    let take = usize::try_from(*remaining).unwrap_or(usize::MAX).min(self.input.len());
                    if take > 0 {
                        if matches!(sink, BdatSink::Store) {
                            if let Some(c) = self.tx.as_mut().and_then(|t| t.bdat.as_mut()) {
                                c.push(self.input.unread().get(..take).unwrap_or(&[]));
                            }
                        }
                        self.input.consume(take);
                        *remaining -= take as u64;
                    }
                    if *remaining > 0 {
                        return;
                    }
                    let phase = std::mem::replace(&mut self.phase, Receiving::Command);
                    if let Receiving::Bdat { last, sink, .. } = phase {
                        self.finish_chunk(last, sink, now);
                    }
                }
                Receiving::Command | Receiving::AuthResponse { .. } => match self.take_line() {
                    None => return,
                    Some(None) => {
                        if let Receiving::AuthResponse { .. } = self.phase {
                            self.phase = Receiving::Command;
                            self.events.push_back(Event::AuthCancelled);
                        }
                        self.send(r(500, (5, 5, 6), "Line too long"), Duration::ZERO, false, now);
                    }
                    Some(Some(line)) => self.process_line(line, now),
                },
                Receiving::Greeting | Receiving::WaitTls | Receiving::Closed => return,
            }
        }
    }

    /// `None`: need more input. `Some(None)`: an over-long line was dropped.
    fn take_line(&mut self) -> Option<Option<Vec<u8>>> {
        let pos = self.input.unread().iter().position(|&b| b == b'\n');
        if self.discarding_line {
            match pos {
                Some(p) => {
                    self.input.consume(p + 1);
                    self.discarding_line = false;
                    return Some(None);
                }
                None => {
                    self.input.clear();
                    return None;
                }
            }
        }
        let is_auth = matches!(self.phase, Receiving::AuthResponse { .. })
            || self.input.unread().get(..5).is_some_and(|p| p.eq_ignore_ascii_case(b"AUTH "));
        let limit = if is_auth {
            self.config.max_auth_line.max(self.config.max_command_line)
        } else {
            self.config.max_command_line
        };
        match pos {
            Some(p) => {
                let line: Vec<u8> = self.input.unread().get(..=p).map(<[u8]>::to_vec).unwrap_or_default();
                self.input.consume(p + 1);
                if line.len() > limit {
                    Some(None)
                } else {
                    Some(Some(line))
                }
            }
            None => {
                if self.input.len() >= limit {
                    self.input.clear();
                    self.discarding_line = true;
                }
                None
            }
        }
    }
}
