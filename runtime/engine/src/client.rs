//! Sans-IO SMTP / LMTP client engine.
//!
//! Like the server engine in [`crate::smtp`], this reads no socket and no
//! clock: the host feeds it the bytes the server sent
//! ([`Client::handle_input`]), writes what [`Client::poll_transmit`] returns,
//! and reacts to [`ClientEvent`]s. Timeouts are the host's: it arms a timer
//! for the phase [`Client::waiting_for`] names and calls
//! [`Client::handle_timeout`] when it fires; a closed connection is
//! [`Client::handle_eof`].
//!
//! # Session
//!
//! Greeting, then `EHLO` (on a 5xx, `HELO`; LMTP: `LHLO`, no fallback), then
//! `STARTTLS` when the [`TlsPolicy`] asks for it and the server offers it
//! ([`ClientEvent::StartTls`]: the host runs the handshake and calls
//! [`Client::tls_established`]; anything the server sent after its `220` is
//! discarded, and `EHLO` is sent again), then `AUTH PLAIN` (or `LOGIN`) when
//! credentials are configured and the server offers `AUTH`. Then
//! [`ClientEvent::Ready`].
//!
//! * [`TlsPolicy::Required`] and no STARTTLS offered, or STARTTLS refused:
//!   the session fails with `451 4.7.4` / `451 4.7.5`.
//! * Credentials configured and the server offers no `AUTH`: the session goes
//!   on without authenticating (Postfix does the same); offered but with no
//!   mechanism we speak, or authentication refused: `454 4.7.0`.
//!
//! # Transactions
//!
//! [`Client::send_message`] sends `MAIL FROM` (with `SIZE`, `BODY=8BITMIME`
//! or `BODY=BINARYMIME`, `SMTPUTF8` when offered and needed, and `RET`/`ENVID`
//! only when the server offers `DSN`, ENVID as xtext), one `RCPT TO` per
//! recipient (`NOTIFY`/`ORCPT` only with `DSN`), then the content: when the
//! server offers `CHUNKING` (RFC 3030, SMTP only, [`ClientConfig::chunking`])
//! as one `BDAT n LAST` chunk, not dot-stuffed (a `BODY=BINARYMIME` message
//! byte for byte, any other with bare CR and LF turned into CRLF); else `DATA`
//! and the dot-stuffed content, bare CR and LF turned into CRLF. With
//! `PIPELINING` offered, MAIL, every RCPT and DATA (or BDAT and its chunk) go
//! in one write (RFC 2920). The result, [`ClientEvent::Transaction`], holds one
//! final reply per recipient, in envelope order: the MAIL reply if MAIL was
//! refused, the RCPT reply if RCPT was refused, the DATA reply if DATA was
//! refused, else the reply to the final dot (LMTP: that recipient's own
//! reply). `next_hop_dsn` says whether the server offered DSN; when false the
//! host owes a "relayed" DSN to recipients that asked for NOTIFY=SUCCESS
//! (RFC 3461 4.1, R1).
//!
//! Without sending anything the engine answers `552 5.3.4` when the message
//! is bigger than the server's `SIZE`; `553 5.6.7` when an address needs
//! SMTPUTF8 and the server does not offer it, and `554 5.6.7` when the message
//! was received with `SMTPUTF8` and its header section holds UTF-8 (RFC 6531
//! 3.2: such a message is never downgraded; with ASCII addresses and headers
//! it goes without SMTPUTF8, as Postfix sends it); `554 5.6.3` for a
//! `BODY=BINARYMIME` message when the server does not offer both CHUNKING and
//! BINARYMIME (RFC 3030 3: no conversion is done).
//!
//! After an incomplete transaction (MAIL, every RCPT or DATA refused) the
//! engine sends `RSET` before it is ready again. [`Client::reset`] sends an
//! `RSET` on demand (a cached connection is probed this way before reuse).
//!
//! [`Client::call_ahead`] sends MAIL FROM and RCPT TO, then RSET, and
//! reports both replies ([`ClientEvent::CallAhead`]); the session stays
//! usable (R27).
//!
//! # Failures
//!
//! A `421` at any point, an unparsable reply, a reply nobody asked for, EOF
//! or a timeout ends the session: a transaction in flight is completed with
//! that reply (made-up ones are `421 4.4.2`) for every recipient without a
//! final reply, then [`ClientEvent::Failed`] tells the phase and the reply.
//! Nothing the server sends can panic the engine.

use std::collections::VecDeque;

use crate::smtp::{BodyType, Envelope, ForwardPath, Recipient, Reply, Ret, ReversePath};

mod replies;
#[cfg(test)]
mod tests;

/// Longest reply line accepted from a server (RFC 5321 says 512; be lenient).
const MAX_LINE: usize = 8192;
/// Most lines in one multi-line reply.
const MAX_REPLY_LINES: usize = 1000;

/// SMTP or LMTP (RFC 2033).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Protocol {
    /// ESMTP with HELO fallback.
    #[default]
    Smtp,
    /// LMTP: LHLO, one reply per recipient after the data.
    Lmtp,
}

/// Client TLS policy (Postfix `smtp_tls_security_level`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum TlsPolicy {
    /// Never send STARTTLS.
    None,
    /// Opportunistic: STARTTLS when offered, no certificate verification.
    #[default]
    May,
    /// STARTTLS mandatory, certificate verified against the trust roots and
    /// the host name; otherwise defer with 4.7.x.
    Required,
}

/// Client SASL credentials.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// Authentication identity.
    pub user: String,
    /// Password.
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({:?}, <hidden>)", self.user)
    }
}

impl Credentials {
    /// Parses `user:password` (split at the first `:`).
    pub fn parse(s: &str) -> Option<Credentials> {
        let (u, p) = s.split_once(':')?;
        if u.is_empty() {
            return None;
        }
        Some(Credentials { user: u.to_string(), password: p.to_string() })
    }
}

/// What the engine is told about the session it should run.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Name sent in EHLO/HELO/LHLO.
    pub helo_name: String,
    /// SMTP or LMTP.
    pub protocol: Protocol,
    /// Whether to send STARTTLS.
    pub tls: TlsPolicy,
    /// Authenticate with these when the server offers AUTH.
    pub auth: Option<Credentials>,
    /// Pipeline MAIL/RCPT/DATA when the server offers PIPELINING.
    pub pipelining: bool,
    /// Send the content with BDAT when the server offers CHUNKING (SMTP only).
    pub chunking: bool,
    /// Every recipient or none: when a RCPT is refused the content is not sent (the
    /// transaction ends with RSET, each recipient's final reply that refusal). Commands
    /// then go one at a time. A before-queue filter runs so: its client already has a
    /// 250 for each recipient.
    pub all_recipients: bool,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            helo_name: "localhost".into(),
            protocol: Protocol::Smtp,
            tls: TlsPolicy::May,
            auth: None,
            pipelining: true,
            chunking: true,
            all_recipients: false,
        }
    }
}

/// The extensions a server announced in its EHLO/LHLO reply.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServerExtensions {
    /// EHLO (or LHLO) was accepted; false after a HELO fallback.
    pub esmtp: bool,
    /// PIPELINING (RFC 2920).
    pub pipelining: bool,
    /// SIZE, with its limit (0: no fixed limit).
    pub size: Option<u64>,
    /// 8BITMIME.
    pub eight_bit_mime: bool,
    /// SMTPUTF8.
    pub smtputf8: bool,
    /// DSN (RFC 3461).
    pub dsn: bool,
    /// STARTTLS.
    pub starttls: bool,
    /// AUTH mechanisms, upper case.
    pub auth: Vec<String>,
    /// ENHANCEDSTATUSCODES.
    pub enhanced_status_codes: bool,
    /// CHUNKING (BDAT, RFC 3030).
    pub chunking: bool,
    /// BINARYMIME (RFC 3030).
    pub binary_mime: bool,
    /// XFORWARD (Postfix's extension), with the attribute names offered, upper case.
    pub xforward: Vec<String>,
}

impl ServerExtensions {
    /// Parses the lines of a positive EHLO reply (the first line is the
    /// server's name and greeting).
    pub fn parse(reply: &Reply) -> ServerExtensions {
        let mut e = ServerExtensions { esmtp: true, ..Default::default() };
        for line in reply.text.split('\n').skip(1) {
            let mut words = line.split_whitespace();
            let Some(kw) = words.next() else { continue };
            let kw = kw.to_ascii_uppercase();
            // old "AUTH=PLAIN LOGIN" form
            let (kw, first_arg) = match kw.split_once('=') {
                Some((k, v)) => (k.to_string(), Some(v.to_string())),
                None => (kw, None),
            };
            let args: Vec<String> =
                first_arg.into_iter().chain(words.map(|w| w.to_string())).filter(|w| !w.is_empty()).collect();
            match kw.as_str() {
                "PIPELINING" => e.pipelining = true,
                "SIZE" => {
                    let n = args.first().and_then(|a| a.parse::<u64>().ok()).unwrap_or(0);
                    e.size = Some(n);
                }
                "8BITMIME" => e.eight_bit_mime = true,
                "SMTPUTF8" => e.smtputf8 = true,
                "DSN" => e.dsn = true,
                "STARTTLS" => e.starttls = true,
                "AUTH" => {
                    for a in args {
                        let a = a.to_ascii_uppercase();
                        if !e.auth.contains(&a) {
                            e.auth.push(a);
                        }
                    }
                }
                "ENHANCEDSTATUSCODES" => e.enhanced_status_codes = true,
                "CHUNKING" => e.chunking = true,
                "BINARYMIME" => e.binary_mime = true,
                "XFORWARD" => e.xforward = args.iter().map(|a| a.to_ascii_uppercase()).collect(),
                _ => {}
            }
        }
        e
    }
}

/// What the engine waits for; the host picks a timeout per phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// The 220 banner.
    Greeting,
    /// The EHLO/HELO/LHLO reply.
    Helo,
    /// The STARTTLS reply, or the host's TLS handshake.
    StartTls,
    /// An AUTH exchange.
    Auth,
    /// The MAIL reply.
    Mail,
    /// A RCPT reply.
    Rcpt,
    /// The DATA (354) reply.
    Data,
    /// The reply(ies) to the final dot, or to `BDAT n LAST`.
    DataEnd,
    /// The RSET reply.
    Rset,
    /// The QUIT reply.
    Quit,
    /// No reply expected (idle), or the connection itself failed.
    Connection,
}

/// A session-ending failure.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionError {
    /// Where it happened.
    pub phase: Phase,
    /// The server's reply, or a made-up 4.4.x / 4.7.x / 4.5.x one.
    pub reply: Reply,
}

/// The outcome of one message transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransactionResult {
    /// The MAIL reply (or the engine's own refusal).
    pub mail: Reply,
    /// One final reply per recipient, in envelope order.
    pub recipients: Vec<Reply>,
    /// The server offered DSN, so NOTIFY/ORCPT/RET/ENVID were passed on.
    pub next_hop_dsn: bool,
}

/// The outcome of a call-ahead.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CallAheadResult {
    /// The MAIL reply.
    pub mail: Reply,
    /// The RCPT reply; `None` when MAIL was refused (then `mail` is the answer).
    pub rcpt: Option<Reply>,
}

impl CallAheadResult {
    /// The reply that answers the question: RCPT's, or MAIL's when refused.
    pub fn answer(&self) -> &Reply {
        self.rcpt.as_ref().unwrap_or(&self.mail)
    }
}

/// What the engine tells the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientEvent {
    /// Idle and able to start a transaction.
    Ready,
    /// The server accepted STARTTLS: run the TLS handshake on the same
    /// connection, then call [`Client::tls_established`].
    StartTls,
    /// A message transaction ended.
    Transaction(TransactionResult),
    /// A call-ahead ended.
    CallAhead(CallAheadResult),
    /// The session is over (no more events); close the connection after
    /// flushing [`Client::poll_transmit`].
    Failed(SessionError),
}

/// Misuse of the engine by the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UsageError {
    /// The session is not idle (not [`ClientEvent::Ready`]).
    NotReady,
    /// The session is closed.
    Closed,
}

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UsageError::NotReady => f.write_str("SMTP client session is not ready"),
            UsageError::Closed => f.write_str("SMTP client session is closed"),
        }
    }
}

impl std::error::Error for UsageError {}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    Greeting,
    Ehlo,
    Helo,
    Lhlo,
    StartTls,
    AuthPlain,
    AuthPlainResponse,
    AuthLoginUser,
    AuthLoginPass,
    AuthFinal,
    /// The reply to one XFORWARD command.
    Xforward,
    Mail,
    Rcpt(usize),
    Data,
    DataEnd,
    /// The reply to `BDAT n LAST`.
    BdatLast,
    LmtpDataEnd(usize),
    /// The dot sent after a 354 that came although no recipient was accepted.
    JunkDataEnd,
    Rset,
    Quit,
}

impl Expect {
    fn phase(self) -> Phase {
        match self {
            Expect::Greeting => Phase::Greeting,
            Expect::Ehlo | Expect::Helo | Expect::Lhlo => Phase::Helo,
            Expect::StartTls => Phase::StartTls,
            Expect::AuthPlain
            | Expect::AuthPlainResponse
            | Expect::AuthLoginUser
            | Expect::AuthLoginPass
            | Expect::AuthFinal => Phase::Auth,
            Expect::Xforward | Expect::Mail => Phase::Mail,
            Expect::Rcpt(_) => Phase::Rcpt,
            Expect::Data => Phase::Data,
            Expect::DataEnd | Expect::BdatLast | Expect::LmtpDataEnd(_) | Expect::JunkDataEnd => Phase::DataEnd,
            Expect::Rset => Phase::Rset,
            Expect::Quit => Phase::Quit,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Greeting, HELO, TLS, AUTH.
    Opening,
    /// Waiting for the host's TLS handshake.
    AwaitTls,
    Ready,
    /// A transaction, call-ahead or RSET in flight.
    Busy,
    /// QUIT sent.
    Closing,
    Closed,
}

#[derive(Debug)]
struct Txn {
    call_ahead: bool,
    pipelined: bool,
    recipients: Vec<Recipient>,
    /// Encoded DATA content (dot-stuffed, CRLF, final dot included), or with
    /// `bdat` the `BDAT n LAST` command line and its chunk.
    data: Vec<u8>,
    /// The content goes with BDAT.
    bdat: bool,
    mail: Option<Reply>,
    finals: Vec<Option<Reply>>,
    rcpt_replies: Vec<Option<Reply>>,
    accepted: Vec<usize>,
    next_rcpt: usize,
    data_sent: bool,
}

/// The client session engine. See the module documentation.
#[derive(Debug)]
pub struct Client {
    cfg: ClientConfig,
    ext: ServerExtensions,
    state: State,
    inbuf: Vec<u8>,
    lines: Vec<String>,
    line_code: Option<u16>,
    expect: VecDeque<Expect>,
    out: Vec<u8>,
    events: VecDeque<ClientEvent>,
    tls_active: bool,
    tls_tried: bool,
    authenticated: bool,
    greeting: Option<Reply>,
    txn: Option<Txn>,
}

/// The longest line sent with DATA, CRLF not counted (RFC 5322 2.1.1, Postfix's
/// `smtp_line_length_limit`).
pub const MAX_TEXT_LINE: usize = 998;

/// Encodes a message for DATA: bare CR or LF become CRLF, lines starting
/// with `.` get another `.`, a line longer than [`MAX_TEXT_LINE`] is broken by inserting
/// CRLF SPACE (as Postfix does, which keeps MIME structure intact), a final CRLF is added
/// if missing, then `.CRLF`.
pub fn encode_data(data: &[u8]) -> Vec<u8> {
    let mut out = encode_lines(data, true);
    out.extend_from_slice(b".\r\n");
    out
}

/// Encodes a message for a BDAT chunk (RFC 3030): as [`encode_data`] without the
/// dot-stuffing and the final dot (canonical CRLF text, long lines broken).
pub fn encode_bdat_text(data: &[u8]) -> Vec<u8> {
    encode_lines(data, false)
}

fn encode_lines(data: &[u8], dot_stuff: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + data.len() / 64 + 8);
    let mut line_start = true;
    let mut line_len = 0usize;
    let mut i = 0;
    while let Some(&b) = data.get(i) {
        if line_len >= MAX_TEXT_LINE && b != b'\r' && b != b'\n' {
            out.extend_from_slice(b"\r\n ");
            line_len = 1;
            line_start = false;
        }
        match b {
            b'\r' => {
                out.extend_from_slice(b"\r\n");
                line_start = true;
                line_len = 0;
                if data.get(i + 1) == Some(&b'\n') {
                    i += 1;
                }
            }
            b'\n' => {
                out.extend_from_slice(b"\r\n");
                line_start = true;
                line_len = 0;
            }
            b'.' if line_start && dot_stuff => {
                out.extend_from_slice(b"..");
                line_start = false;
                line_len += 1;
            }
            _ => {
                out.push(b);
                line_start = false;
                line_len += 1;
            }
        }
        i += 1;
    }
    if !line_start {
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// The header section holds a byte outside ASCII (an SMTPUTF8 message's UTF-8 headers).
fn utf8_headers(data: &[u8]) -> bool {
    let end = crate::headers::header_end(data).min(data.len());
    data.get(..end).is_some_and(|h| !h.is_ascii())
}

/// RFC 3461 xtext encoding.
pub fn encode_xtext(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (33..=126).contains(&b) && b != b'+' && b != b'=' {
            out.push(b as char);
        } else {
            out.push_str(&format!("+{b:02X}"));
        }
    }
    out
}

fn parse_enhanced(s: &str, class: u16) -> Option<(u8, u16, u16)> {
    let mut it = s.split('.');
    let c: u8 = it.next()?.parse().ok()?;
    let sub: u16 = it.next()?.parse().ok()?;
    let det: u16 = it.next()?.parse().ok()?;
    if it.next().is_some() || u16::from(c) != class || sub > 999 || det > 999 {
        return None;
    }
    Some((c, sub, det))
}

/// Builds a [`Reply`] from the text of the lines of one (multi-line) reply.
fn assemble_reply(code: u16, lines: &[String]) -> Reply {
    let class = code / 100;
    let enhanced = lines.first().and_then(|l| l.split(' ').next()).and_then(|w| parse_enhanced(w, class));
    let text: Vec<&str> = lines
        .iter()
        .map(|l| {
            if let Some((c, s, d)) = enhanced {
                let prefix = format!("{c}.{s}.{d}");
                if let Some(rest) = l.strip_prefix(prefix.as_str()) {
                    return rest.strip_prefix(' ').unwrap_or(rest);
                }
            }
            l.as_str()
        })
        .collect();
    Reply { code, enhanced, text: text.join("\n") }
}

fn made_up(code: u16, e: (u8, u16, u16), text: impl Into<String>) -> Reply {
    Reply::new(code, e, text)
}

fn needs_utf8(env: &Envelope) -> bool {
    let from = match &env.from {
        ReversePath::Null => false,
        ReversePath::Mailbox(m) => m.is_international(),
    };
    from || env.recipients.iter().any(|r| match &r.path {
        ForwardPath::Postmaster => false,
        ForwardPath::Mailbox(m) => m.is_international(),
    })
}

impl Client {
    /// A session on a fresh connection; expects the server's greeting.
    pub fn new(cfg: ClientConfig) -> Client {
        Client {
            cfg,
            ext: ServerExtensions::default(),
            state: State::Opening,
            inbuf: Vec::new(),
            lines: Vec::new(),
            line_code: None,
            expect: VecDeque::from([Expect::Greeting]),
            out: Vec::new(),
            events: VecDeque::new(),
            tls_active: false,
            tls_tried: false,
            authenticated: false,
            greeting: None,
            txn: None,
        }
    }

    /// A session on a connection that is already encrypted (implicit TLS):
    /// STARTTLS is never sent.
    pub fn new_tls(cfg: ClientConfig) -> Client {
        let mut c = Client::new(cfg);
        c.tls_active = true;
        c
    }

    /// The extensions of the last EHLO/LHLO reply.
    pub fn extensions(&self) -> &ServerExtensions {
        &self.ext
    }

    /// The server's greeting.
    pub fn greeting(&self) -> Option<&Reply> {
        self.greeting.as_ref()
    }

    /// True once STARTTLS completed (or for [`Client::new_tls`]).
    pub fn tls_active(&self) -> bool {
        self.tls_active
    }

    /// True after a successful AUTH.
    pub fn authenticated(&self) -> bool {
        self.authenticated
    }

    /// Idle: a transaction or call-ahead may start.
    pub fn is_ready(&self) -> bool {
        self.state == State::Ready
    }

    /// The session is over; drop the connection once output is flushed.
    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// What the engine waits for, or `None` when idle, waiting for the host
    /// (TLS handshake: [`Phase::StartTls`] is returned), or closed.
    pub fn waiting_for(&self) -> Option<Phase> {
        match self.state {
            State::Closed | State::Ready => None,
            State::AwaitTls => Some(Phase::StartTls),
            _ => self.expect.front().map(|e| e.phase()),
        }
    }

    /// Bytes to send to the server.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        if self.out.is_empty() {
            None
        } else {
            Some(std::mem::take(&mut self.out))
        }
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<ClientEvent> {
        self.events.pop_front()
    }

    /// Feeds bytes received from the server.
    pub fn handle_input(&mut self, data: &[u8]) {
        if matches!(self.state, State::Closed | State::AwaitTls) {
            return;
        }
        self.inbuf.extend_from_slice(data);
        let mut start = 0;
        while let Some(pos) = self.inbuf.get(start..).and_then(|b| b.iter().position(|&c| c == b'\n')) {
            let end = start + pos;
            let line = self.inbuf.get(start..end).unwrap_or_default().to_vec();
            start = end + 1;
            if line.len() > MAX_LINE {
                self.protocol_error("reply line too long");
                break;
            }
            self.handle_line(&line);
            if matches!(self.state, State::Closed | State::AwaitTls) {
                break;
            }
        }
        if matches!(self.state, State::Closed | State::AwaitTls) {
            // After the 220 to STARTTLS everything already received is
            // discarded (response injection, CVE-2011-0411 in reverse).
            self.inbuf.clear();
            return;
        }
        self.inbuf.drain(..start.min(self.inbuf.len()));
        if self.inbuf.len() > MAX_LINE {
            self.protocol_error("reply line too long");
        }
    }

    /// The server closed the connection.
    pub fn handle_eof(&mut self) {
        match self.state {
            State::Closed => {}
            State::Closing => self.state = State::Closed,
            _ => {
                let phase = self.waiting_for().unwrap_or(Phase::Connection);
                self.fail_closed(phase, made_up(421, (4, 4, 2), "lost connection with the server"));
            }
        }
    }

    /// The host's timer for [`Client::waiting_for`] fired.
    pub fn handle_timeout(&mut self) {
        if let Some(phase) = self.waiting_for() {
            if self.state == State::Closing {
                self.state = State::Closed;
                return;
            }
            self.fail_closed(
                phase,
                made_up(421, (4, 4, 2), format!("timeout while waiting for the server ({phase:?})")),
            );
        }
    }

    /// The host could not go on (TLS handshake failed, write error, ...):
    /// ends the session with `reply`, completing any transaction in flight.
    pub fn abort(&mut self, reply: Reply) {
        if self.state == State::Closed {
            return;
        }
        let phase = self.waiting_for().unwrap_or(Phase::Connection);
        self.fail_closed(phase, reply);
    }

    /// The TLS handshake after [`ClientEvent::StartTls`] succeeded: the
    /// session starts again with EHLO/LHLO.
    pub fn tls_established(&mut self) -> Result<(), UsageError> {
        if self.state != State::AwaitTls {
            return Err(UsageError::NotReady);
        }
        self.tls_active = true;
        self.ext = ServerExtensions::default();
        self.state = State::Opening;
        self.send_hello();
        Ok(())
    }

    /// Starts a message transaction.
    pub fn send_message(&mut self, env: &Envelope, data: &[u8]) -> Result<(), UsageError> {
        self.check_ready()?;
        let binary = env.params.body == BodyType::BinaryMime;
        let bdat = self.cfg.protocol == Protocol::Smtp && self.cfg.chunking && self.ext.chunking;
        let encoded = if !bdat {
            encode_data(data)
        } else if binary {
            data.to_vec()
        } else {
            encode_bdat_text(data)
        };
        let n = env.recipients.len();
        // checks that need no round trip; the size is as sent (CRLF, and
        // counting dot-stuffing, a slight overestimate RFC 1870 allows)
        let size = if bdat { encoded.len() as u64 } else { encoded.len().saturating_sub(3) as u64 };
        let refuse = if let Some(limit) = self.ext.size.filter(|l| *l > 0 && size > *l) {
            Some(made_up(552, (5, 3, 4), format!("message size {size} exceeds the next hop's limit of {limit}")))
        } else if needs_utf8(env) && !self.ext.smtputf8 {
            Some(made_up(553, (5, 6, 7), "the next hop does not support SMTPUTF8, required by an address"))
        } else if env.params.smtputf8 && !self.ext.smtputf8 && utf8_headers(data) {
            Some(made_up(
                554,
                (5, 6, 7),
                "the next hop does not support SMTPUTF8, required by the message's UTF-8 header",
            ))
        } else if binary && !(bdat && self.ext.binary_mime) {
            Some(made_up(
                554,
                (5, 6, 3),
                "the next hop does not support BINARYMIME and CHUNKING, required by this binary message",
            ))
        } else if n == 0 {
            Some(made_up(554, (5, 5, 1), "no recipients"))
        } else {
            None
        };
        if let Some(r) = refuse {
            self.events.push_back(ClientEvent::Transaction(TransactionResult {
                mail: r.clone(),
                recipients: vec![r; n],
                next_hop_dsn: self.ext.dsn,
            }));
            self.events.push_back(ClientEvent::Ready);
            return Ok(());
        }
        let mut mail = format!("MAIL FROM:{}", env.from);
        if self.ext.size.is_some() {
            mail.push_str(&format!(" SIZE={size}"));
        }
        if binary {
            mail.push_str(" BODY=BINARYMIME");
        } else if env.params.body != BodyType::SevenBit && self.ext.eight_bit_mime {
            mail.push_str(" BODY=8BITMIME");
        }
        if (env.params.smtputf8 || needs_utf8(env)) && self.ext.smtputf8 {
            mail.push_str(" SMTPUTF8");
        }
        if self.ext.dsn {
            match env.params.ret {
                Some(Ret::Full) => mail.push_str(" RET=FULL"),
                Some(Ret::Hdrs) => mail.push_str(" RET=HDRS"),
                None => {}
            }
            if let Some(id) = &env.params.envid {
                mail.push_str(&format!(" ENVID={}", encode_xtext(id)));
            }
        }
        let content = if bdat {
            let mut c = format!("BDAT {} LAST\r\n", encoded.len()).into_bytes();
            c.extend_from_slice(&encoded);
            c
        } else {
            encoded
        };
        self.start_txn(mail, env.recipients.clone(), content, bdat, false);
        Ok(())
    }

    /// Sends the client attributes the server's XFORWARD offers (Postfix's XFORWARD:
    /// `NAME`, `ADDR`, `PORT`, `PROTO`, `HELO`, `IDENT`, `SOURCE`), the values xtext-encoded,
    /// in commands of at most 512 bytes; attributes the server does not name are left out.
    /// [`ClientEvent::Ready`] follows when the server accepted them all; a refusal ends
    /// the session ([`ClientEvent::Failed`]). Nothing is sent (and `Ready` follows at once)
    /// when the server offers no XFORWARD.
    pub fn xforward(&mut self, attrs: &[(&str, String)]) -> Result<(), UsageError> {
        self.check_ready()?;
        let mut lines: Vec<String> = Vec::new();
        let mut line = String::from("XFORWARD");
        for (name, value) in attrs {
            let name = name.to_ascii_uppercase();
            if !self.ext.xforward.contains(&name) {
                continue;
            }
            let value: String = value.chars().filter(|c| !c.is_control()).take(255).collect();
            let item = format!(" {name}={}", encode_xtext(&value));
            if line.len() + item.len() > 510 && line.len() > "XFORWARD".len() {
                lines.push(std::mem::replace(&mut line, String::from("XFORWARD")));
            }
            line.push_str(&item);
        }
        if line.len() > "XFORWARD".len() {
            lines.push(line);
        }
        if lines.is_empty() {
            self.events.push_back(ClientEvent::Ready);
            return Ok(());
        }
        self.state = State::Busy;
        for l in lines {
            self.send_cmd(&l, Expect::Xforward);
        }
        Ok(())
    }

    /// Call-ahead: MAIL FROM, RCPT TO, then RSET (R27).
    pub fn call_ahead(&mut self, from: &ReversePath, rcpt: &ForwardPath) -> Result<(), UsageError> {
        self.check_ready()?;
        let r = Recipient { path: rcpt.clone(), params: Default::default() };
        self.start_txn(format!("MAIL FROM:{from}"), vec![r], Vec::new(), false, true);
        Ok(())
    }

    /// Sends RSET; [`ClientEvent::Ready`] follows on success.
    pub fn reset(&mut self) -> Result<(), UsageError> {
        self.check_ready()?;
        self.state = State::Busy;
        self.send_cmd("RSET", Expect::Rset);
        Ok(())
    }

    /// Sends QUIT. The session ends on its reply, on EOF, or when the host
    /// stops caring; no event follows.
    pub fn quit(&mut self) {
        match self.state {
            State::Closed | State::Closing => {}
            State::AwaitTls => self.state = State::Closed,
            _ => {
                self.txn = None;
                self.expect.clear();
                self.send_cmd("QUIT", Expect::Quit);
                self.state = State::Closing;
            }
        }
    }

    fn check_ready(&self) -> Result<(), UsageError> {
        match self.state {
            State::Ready => Ok(()),
            State::Closed | State::Closing => Err(UsageError::Closed),
            _ => Err(UsageError::NotReady),
        }
    }

    fn start_txn(&mut self, mail: String, recipients: Vec<Recipient>, data: Vec<u8>, bdat: bool, ca: bool) {
        let n = recipients.len();
        let pipelined = self.cfg.pipelining && self.ext.pipelining && !self.cfg.all_recipients;
        self.state = State::Busy;
        self.send_cmd(&mail, Expect::Mail);
        let txn = Txn {
            call_ahead: ca,
            pipelined,
            recipients,
            data,
            bdat,
            mail: None,
            finals: vec![None; n],
            rcpt_replies: vec![None; n],
            accepted: Vec::new(),
            next_rcpt: 0,
            data_sent: false,
        };
        self.txn = Some(txn);
        if pipelined {
            for i in 0..n {
                self.send_rcpt(i);
            }
            if ca {
                self.send_cmd("RSET", Expect::Rset);
            } else if bdat {
                self.send_bdat();
            } else {
                self.send_cmd("DATA", Expect::Data);
            }
        }
    }

    /// Sends the transaction's `BDAT n LAST` and its chunk (already framed).
    fn send_bdat(&mut self) {
        if let Some(t) = self.txn.as_mut() {
            let data = std::mem::take(&mut t.data);
            t.data_sent = true;
            self.out.extend_from_slice(&data);
            self.expect.push_back(Expect::BdatLast);
        }
    }

    fn rcpt_line(&self, r: &Recipient) -> String {
        let mut s = format!("RCPT TO:{}", r.path);
        if self.ext.dsn {
            if let Some(n) = r.params.notify {
                let mut v = Vec::new();
                if n.never {
                    v.push("NEVER");
                } else {
                    if n.success {
                        v.push("SUCCESS");
                    }
                    if n.failure {
                        v.push("FAILURE");
                    }
                    if n.delay {
                        v.push("DELAY");
                    }
                }
                if !v.is_empty() {
                    s.push_str(" NOTIFY=");
                    s.push_str(&v.join(","));
                }
            }
            if let Some(o) = &r.params.orcpt {
                s.push_str(&format!(" ORCPT={};{}", encode_xtext(&o.addr_type), encode_xtext(&o.address)));
            }
        }
        s
    }

    fn send_rcpt(&mut self, i: usize) {
        let Some(line) = self.txn.as_ref().and_then(|t| t.recipients.get(i)).map(|r| self.rcpt_line(r)) else {
            return;
        };
        if let Some(t) = self.txn.as_mut() {
            t.next_rcpt = i + 1;
        }
        self.send_cmd(&line, Expect::Rcpt(i));
    }

    fn send_cmd(&mut self, line: &str, e: Expect) {
        // never let our own strings break the command framing
        let clean: String = line.chars().map(|c| if c == '\r' || c == '\n' { '?' } else { c }).collect();
        self.out.extend_from_slice(clean.as_bytes());
        self.out.extend_from_slice(b"\r\n");
        self.expect.push_back(e);
    }

    fn send_hello(&mut self) {
        let (verb, e) = match self.cfg.protocol {
            Protocol::Smtp => ("EHLO", Expect::Ehlo),
            Protocol::Lmtp => ("LHLO", Expect::Lhlo),
        };
        let line = format!("{verb} {}", self.cfg.helo_name);
        self.send_cmd(&line, e);
    }

    fn protocol_error(&mut self, what: &str) {
        let phase = self.waiting_for().unwrap_or(Phase::Connection);
        self.fail_closed(phase, made_up(421, (4, 5, 0), format!("protocol error from server: {what}")));
    }
}
