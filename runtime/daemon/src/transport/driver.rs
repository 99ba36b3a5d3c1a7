//! The tokio driver: runs a [`Client`] over TCP, TLS or a unix socket, and
//! delivers one message to one [`Target`].
//!
//! * Next hops come from [`mx::resolve`]; the next one is tried (at most
//!   [`DeliveryOptions::max_hops`] addresses) when the connection fails or
//!   the session fails before the first transaction (4xx or 5xx greeting,
//!   HELO refused, TLS unavailable...). A 5xx greeting is a deferral, as in
//!   Postfix (`smtp_skip_5xx_greeting`).
//! * Per-recipient outcome: 2xx [`DeliveryOutcome::Delivered`], 4xx
//!   [`DeliveryOutcome::Deferred`], 5xx [`DeliveryOutcome::Failed`]; connection errors and
//!   timeouts are deferrals with a made-up `4.4.x` reply.
//! * TLS ([`TlsPolicy`]): `May` encrypts when STARTTLS is offered without
//!   verifying the certificate (a handshake failure retries the same address
//!   in clear once, like Postfix); `Required` verifies the chain against the
//!   system's trust store ([`system_roots`], or [`DeliveryOptions::tls_roots`]) and the host name, and
//!   defers with `4.7.x` otherwise; `None` never sends STARTTLS.
//!   [`DeliveryOptions::implicit_tls`] (RFC 8314, a smarthost's port 465)
//!   starts TLS on connect, the certificate verified as with `Required`, and
//!   never speaks in clear. [`DeliveryOptions::client_cert`] is presented to a
//!   next hop that asks for a client certificate (either way of starting TLS).
//! * A greeting other than 220 (a `421` included) fails that address: the
//!   next one is tried; when none is left the recipients are deferred.
//! * [`DeliveryOptions::fallback`] (the server's `fallback_relay`, R33): when
//!   MX delivery fails temporarily before a transaction started (no address
//!   could be reached, every one refused the session, or the MX lookup failed
//!   temporarily), the fallback host's addresses are tried next. A permanent
//!   DNS answer (no such domain, null MX) is final and never sent there.
//! * A [`ConnectionCache`] keeps idle sessions by [`SessionKey`] (transport,
//!   destination, TLS parameters, login), so a destination gets several
//!   messages per session; a cached session is probed with RSET before reuse
//!   and dropped if that fails, and closed after `max_uses` messages or
//!   `max_age` (Postfix's `smtp_connection_reuse_*_limit`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::timeout;

use super::client::{Client, ClientConfig, ClientEvent, Credentials, Phase, Protocol, SessionError, TlsPolicy};
use super::mx::{self, Destination, Hop, LocalIdentity, Resolver};
use super::security::{self, Planned, Security, Standards, TlsDecision};
use crate::smtp::{Envelope, ForwardPath, Reply, ReversePath};

mod cache;
mod connect;
mod tls;

pub use cache::{ConnectionCache, SessionKey, TlsKey};
use connect::{open, release, Endpoint};
use tls::handshake;
pub(crate) use tls::NoVerify;
pub use tls::{roots_from_pem, system_roots};

/// What happened to one recipient.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeliveryOutcome {
    /// Accepted by the next hop (or written to the mailbox).
    Delivered(Reply),
    /// Temporary failure: retry later.
    Deferred(Reply),
    /// Permanent failure: bounce.
    Failed(Reply),
}

impl DeliveryOutcome {
    /// Classifies a reply: 2xx delivered, 5xx failed, anything else deferred.
    pub fn from_reply(r: Reply) -> DeliveryOutcome {
        match r.code {
            200..=299 => DeliveryOutcome::Delivered(r),
            500..=599 => DeliveryOutcome::Failed(r),
            _ => DeliveryOutcome::Deferred(r),
        }
    }

    /// The reply behind the outcome.
    pub fn reply(&self) -> &Reply {
        match self {
            DeliveryOutcome::Delivered(r) | DeliveryOutcome::Deferred(r) | DeliveryOutcome::Failed(r) => r,
        }
    }
}

/// The result of one delivery attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeliveryReport {
    /// One outcome per envelope recipient, in envelope order.
    pub recipients: Vec<DeliveryOutcome>,
    /// The server that answered last (DSN `Remote-MTA`), e.g. `mx.example.com[192.0.2.1]:25`.
    pub remote_mta: Option<String>,
    /// The host name part of `remote_mta` (for `Remote-MTA: dns; name`).
    pub remote_host: Option<String>,
    /// The next hop offered DSN; when false, recipients with NOTIFY=SUCCESS
    /// that were delivered are owed a "relayed" DSN (R1).
    pub next_hop_dsn: bool,
    /// The session was encrypted.
    pub tls: bool,
    /// How the session's TLS was decided ([`TlsDecision::label`]: `may`, `dane`,
    /// `sts enforce`...); None when no session was made.
    pub tls_policy: Option<&'static str>,
    /// How long the connection took to set up (MX and address lookups, connect, greeting,
    /// EHLO, STARTTLS): Postfix's `delays=` third part. None for local delivery.
    pub setup: Option<Duration>,
}

impl DeliveryReport {
    fn all(n: usize, o: DeliveryOutcome) -> DeliveryReport {
        DeliveryReport {
            recipients: vec![o; n],
            remote_mta: None,
            remote_host: None,
            next_hop_dsn: false,
            tls: false,
            tls_policy: None,
            setup: None,
        }
    }
}

/// An LMTP server address.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum LmtpEndpoint {
    /// TCP, no MX lookup (e.g. `[127.0.0.1]:24`).
    Tcp(Destination),
    /// A unix-domain socket (e.g. Dovecot's `/run/dovecot/lmtp`).
    Unix(PathBuf),
}

/// Where a message goes.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    /// SMTP to a domain's MX hosts, a `[host]`, or a relay host.
    Smtp(Destination),
    /// LMTP hand-off to a mailbox server (R35).
    Lmtp(LmtpEndpoint),
    /// A Maildir (the directory holding `cur new tmp`), confined when built from client data.
    Maildir(crate::paths::Confined),
    /// An mbox file, confined when built from client data.
    Mbox(crate::paths::Confined),
}

impl std::fmt::Display for Target {
    /// What a log line says: `smtp:[10.0.0.5]:25`, `smtp:example.com:25` (by MX),
    /// `lmtp:[127.0.0.1]:24`, `lmtp:unix:/run/dovecot/lmtp`, `maildir:/var/mail/a`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Smtp(d) => write!(f, "smtp:{d}"),
            Target::Lmtp(LmtpEndpoint::Tcp(d)) => write!(f, "lmtp:{d}"),
            Target::Lmtp(LmtpEndpoint::Unix(p)) => write!(f, "lmtp:unix:{}", p.display()),
            Target::Maildir(p) => write!(f, "maildir:{}", p.path.display()),
            Target::Mbox(p) => write!(f, "mbox:{}", p.path.display()),
        }
    }
}

impl Target {
    /// Parses `smtp:DEST`, `lmtp:unix:/path`, `lmtp:DEST` (`lmtp:inet:DEST`),
    /// `maildir:/path`, `mbox:/path`; DEST as [`Destination::parse`]. LMTP
    /// over TCP never looks up MX.
    pub fn parse(s: &str) -> Option<Target> {
        let (kind, rest) = s.split_once(':')?;
        match kind.to_ascii_lowercase().as_str() {
            "smtp" => Destination::parse(rest).map(Target::Smtp),
            "lmtp" => {
                if let Some(p) = rest.strip_prefix("unix:") {
                    return Some(Target::Lmtp(LmtpEndpoint::Unix(PathBuf::from(p))));
                }
                let rest = rest.strip_prefix("inet:").unwrap_or(rest);
                let mut d = Destination::parse(rest)?;
                d.mx = false;
                if !rest.contains(':') && !rest.ends_with(']') {
                    d.port = 24;
                }
                Some(Target::Lmtp(LmtpEndpoint::Tcp(d)))
            }
            "maildir" if !rest.is_empty() => Some(Target::Maildir(crate::paths::Confined::parse(rest))),
            "mbox" if !rest.is_empty() => Some(Target::Mbox(crate::paths::Confined::parse(rest))),
            _ => None,
        }
    }
}

/// Per-phase timeouts (Postfix defaults).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP connect (`smtp_connect_timeout`, 30s).
    pub connect: Duration,
    /// Banner and EHLO/HELO (`smtp_helo_timeout`, 300s).
    pub helo: Duration,
    /// STARTTLS and the handshake (`smtp_starttls_timeout`, 300s).
    pub starttls: Duration,
    /// AUTH exchange (300s).
    pub auth: Duration,
    /// MAIL reply (300s).
    pub mail: Duration,
    /// RCPT reply (300s).
    pub rcpt: Duration,
    /// DATA reply (`smtp_data_init_timeout`, 120s).
    pub data_init: Duration,
    /// Each write of the content (`smtp_data_xfer_timeout`, 180s).
    pub data_xfer: Duration,
    /// Reply to the final dot (`smtp_data_done_timeout`, 600s).
    pub data_done: Duration,
    /// RSET reply (20s).
    pub rset: Duration,
    /// QUIT reply (300s; we never wait more than 10s).
    pub quit: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        let s = Duration::from_secs;
        Timeouts {
            connect: s(30),
            helo: s(300),
            starttls: s(300),
            auth: s(300),
            mail: s(300),
            rcpt: s(300),
            data_init: s(120),
            data_xfer: s(180),
            data_done: s(600),
            rset: s(20),
            quit: s(300),
        }
    }
}

impl Timeouts {
    /// Every phase limited to `d` (tests).
    pub fn all(d: Duration) -> Timeouts {
        Timeouts {
            connect: d,
            helo: d,
            starttls: d,
            auth: d,
            mail: d,
            rcpt: d,
            data_init: d,
            data_xfer: d,
            data_done: d,
            rset: d,
            quit: d,
        }
    }

    /// The timeout for waiting in `phase`.
    pub fn for_phase(&self, phase: Phase) -> Duration {
        match phase {
            Phase::Greeting | Phase::Helo => self.helo,
            Phase::StartTls => self.starttls,
            Phase::Auth => self.auth,
            Phase::Mail => self.mail,
            Phase::Rcpt => self.rcpt,
            Phase::Data => self.data_init,
            Phase::DataEnd => self.data_done,
            Phase::Rset => self.rset,
            Phase::Quit => self.quit.min(Duration::from_secs(10)),
            Phase::Connection => self.connect,
        }
    }
}

/// How to deliver.
#[derive(Clone)]
pub struct DeliveryOptions {
    /// Our name in EHLO/LHLO.
    pub helo_name: String,
    /// STARTTLS policy (SMTP only; LMTP never uses TLS).
    pub tls: TlsPolicy,
    /// Client AUTH credentials (smarthost, R10).
    pub auth: Option<Credentials>,
    /// Timeouts.
    pub timeouts: Timeouts,
    /// DNS.
    pub resolver: Arc<dyn Resolver>,
    /// Our names and addresses (MX loop detection).
    pub local: LocalIdentity,
    /// Idle sessions to reuse; `None`: QUIT after each message.
    pub cache: Option<Arc<ConnectionCache>>,
    /// Trust roots for `TlsPolicy::Required`; `None`: the webpki roots.
    pub tls_roots: Option<Arc<rustls::RootCertStore>>,
    /// Most addresses tried per delivery (Postfix `smtp_mx_address_limit`).
    pub max_hops: usize,
    /// Use PIPELINING when offered.
    pub pipelining: bool,
    /// Send with BDAT when the next hop offers CHUNKING (SMTP only).
    pub chunking: bool,
    /// TLS from the first byte (RFC 8314); verified as [`TlsPolicy::Required`].
    pub implicit_tls: bool,
    /// The client certificate to present when a next hop asks (`:cert`/`:key`).
    pub client_cert: Option<ClientCert>,
    /// Tried when MX delivery fails temporarily (the server's `fallback_relay`, R33).
    pub fallback: Option<Destination>,
    /// `:tls dane` / `:tls sts`: each next hop's TLS decided by DANE and MTA-STS
    /// ([`security::plan`]); [`Standards::Fixed`]: `tls` for every hop.
    pub standards: Standards,
    /// What DANE, MTA-STS and TLS-RPT need; without it `standards` is `Fixed`.
    pub security: Option<Arc<Security>>,
}

/// A client certificate chain and its private key (`:cert "FILE" :key "FILE"`).
#[derive(Clone)]
pub struct ClientCert {
    chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    key: Arc<rustls::pki_types::PrivateKeyDer<'static>>,
    /// The certificate file, for the session cache key and logs.
    pub path: String,
}

impl ClientCert {
    /// Reads the PEM chain and key; an unreadable file is an error for the administrator.
    pub fn from_pem(cert: &std::path::Path, key: &std::path::Path) -> Result<ClientCert, String> {
        let chain = crate::tls::read_certs(cert)?;
        let k = crate::tls::read_key(key)?;
        Ok(ClientCert { chain, key: Arc::new(k), path: cert.display().to_string() })
    }
}

impl std::fmt::Debug for ClientCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClientCert({:?}, <key hidden>)", self.path)
    }
}

impl std::fmt::Debug for DeliveryOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeliveryOptions")
            .field("helo_name", &self.helo_name)
            .field("tls", &self.tls)
            .field("auth", &self.auth)
            .field("timeouts", &self.timeouts)
            .field("local", &self.local)
            .field("max_hops", &self.max_hops)
            .field("implicit_tls", &self.implicit_tls)
            .field("client_cert", &self.client_cert)
            .field("fallback", &self.fallback)
            .field("standards", &self.standards)
            .finish_non_exhaustive()
    }
}

impl DeliveryOptions {
    /// Defaults: opportunistic TLS, no AUTH, Postfix timeouts, no cache, 5 hops.
    pub fn new(helo_name: impl Into<String>, resolver: Arc<dyn Resolver>) -> DeliveryOptions {
        DeliveryOptions {
            helo_name: helo_name.into(),
            tls: TlsPolicy::May,
            auth: None,
            timeouts: Timeouts::default(),
            resolver,
            local: LocalIdentity::default(),
            cache: None,
            tls_roots: None,
            max_hops: 5,
            pipelining: true,
            chunking: true,
            implicit_tls: false,
            client_cert: None,
            fallback: None,
            standards: Standards::Fixed,
            security: None,
        }
    }
}

/// A byte stream the driver can run a session on.
pub trait IoStream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> IoStream for T {}

/// A live session: the engine and its connection.
pub struct Connection {
    client: Client,
    stream: Option<Box<dyn IoStream>>,
    /// Host name (TLS server name, Remote-MTA).
    name: String,
    /// `name[addr]:port` or the socket path.
    label: String,
    tls: TlsDecision,
    tls_roots: Option<Arc<rustls::RootCertStore>>,
    client_cert: Option<ClientCert>,
    tls_failed: bool,
    /// Under `sts testing`: why the certificate would have been refused.
    tls_finding: Arc<Mutex<Option<String>>>,
    /// When the connection was made (`connection_reuse_time_limit`).
    opened: Instant,
    /// Messages (and call-ahead questions) sent over it (`connection_reuse_count_limit`).
    uses: u64,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection").field("label", &self.label).field("client", &self.client).finish_non_exhaustive()
    }
}

fn conn_reply(text: String) -> Reply {
    Reply::new(421, (4, 4, 1), text)
}

impl Connection {
    /// Wraps an established stream; the engine expects the greeting.
    pub fn new(stream: Box<dyn IoStream>, name: &str, label: &str, cfg: ClientConfig) -> Self {
        let tls = TlsDecision::Fixed(cfg.tls);
        Connection {
            client: Client::new(cfg),
            stream: Some(stream),
            name: name.to_string(),
            label: label.to_string(),
            tls,
            tls_roots: None,
            client_cert: None,
            tls_failed: false,
            tls_finding: Arc::new(Mutex::new(None)),
            opened: Instant::now(),
            uses: 0,
        }
    }

    /// Wraps a stream that is already encrypted (implicit TLS): STARTTLS is never sent.
    pub fn new_tls(stream: Box<dyn IoStream>, name: &str, label: &str, cfg: ClientConfig) -> Self {
        let mut c = Connection::new(stream, name, label, cfg.clone());
        c.client = Client::new_tls(cfg);
        c
    }

    /// The engine.
    pub fn client(&self) -> &Client {
        &self.client
    }

    async fn starttls(&mut self, t: &Timeouts) -> Result<(), Reply> {
        let Some(stream) = self.stream.take() else {
            return Err(conn_reply("connection already gone".into()));
        };
        let r = handshake(
            stream,
            &self.name,
            &self.label,
            &self.tls,
            self.tls_roots.as_ref(),
            self.client_cert.as_ref(),
            &self.tls_finding,
            t.starttls,
        )
        .await;
        match r {
            Ok(s) => {
                self.stream = Some(s);
                Ok(())
            }
            Err((failed, r)) => {
                self.tls_failed |= failed;
                Err(r)
            }
        }
    }

    /// Runs I/O until the engine has an event for the caller (STARTTLS is
    /// handled here). `None`: the session is over with nothing to report.
    pub async fn next_event(&mut self, t: &Timeouts) -> Option<ClientEvent> {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            if let Some(bytes) = self.client.poll_transmit() {
                let limit = match self.client.waiting_for() {
                    Some(Phase::DataEnd) => t.data_xfer,
                    Some(p) => t.for_phase(p),
                    None => t.rset,
                };
                let ok = match self.stream.as_mut() {
                    Some(s) => matches!(
                        timeout(limit, async {
                            s.write_all(&bytes).await?;
                            s.flush().await
                        })
                        .await,
                        Ok(Ok(()))
                    ),
                    None => false,
                };
                if !ok {
                    self.client.abort(Reply::new(
                        421,
                        (4, 4, 2),
                        format!("lost connection with {} while sending", self.label),
                    ));
                    self.stream = None;
                }
            }
            if let Some(ev) = self.client.poll_event() {
                if ev == ClientEvent::StartTls {
                    match self.starttls(t).await {
                        Ok(()) => {
                            let _ = self.client.tls_established();
                        }
                        Err(r) => {
                            self.stream = None;
                            self.client.abort(r);
                        }
                    }
                    continue;
                }
                return Some(ev);
            }
            if self.client.is_closed() {
                return None;
            }
            let phase = self.client.waiting_for()?;
            let Some(s) = self.stream.as_mut() else {
                self.client.handle_eof();
                continue;
            };
            match timeout(t.for_phase(phase), s.read(&mut buf)).await {
                Ok(Ok(0)) => self.client.handle_eof(),
                Ok(Ok(n)) => self.client.handle_input(buf.get(..n).unwrap_or_default()),
                Ok(Err(e)) => {
                    self.client.abort(Reply::new(421, (4, 4, 2), format!("lost connection with {}: {e}", self.label)))
                }
                Err(_) => self.client.handle_timeout(),
            }
        }
    }

    /// Drives the session until it is ready (greeting, EHLO, TLS, AUTH done).
    pub async fn wait_ready(&mut self, t: &Timeouts) -> Result<(), SessionError> {
        loop {
            match self.next_event(t).await {
                Some(ClientEvent::Ready) => return Ok(()),
                Some(ClientEvent::Failed(e)) => return Err(e),
                Some(_) => {}
                None => {
                    return Err(SessionError {
                        phase: Phase::Connection,
                        reply: Reply::new(421, (4, 4, 2), "session closed"),
                    })
                }
            }
        }
    }

    /// Sends QUIT, waits briefly for the reply, closes.
    pub async fn close(mut self, t: &Timeouts) {
        self.client.quit();
        while self.next_event(t).await.is_some() {}
        if let Some(mut s) = self.stream.take() {
            let _ = timeout(Duration::from_secs(2), s.shutdown()).await;
        }
    }
}

async fn deliver_session(
    kind: &'static str,
    endpoint: &Endpoint,
    env: &Envelope,
    data: &[u8],
    opts: &DeliveryOptions,
) -> DeliveryReport {
    let n = env.recipients.len();
    let started = std::time::Instant::now();
    let (mut c, key) = match open(kind, endpoint, opts).await {
        Ok(x) => x,
        Err(r) => {
            return DeliveryReport {
                setup: Some(started.elapsed()),
                ..DeliveryReport::all(n, DeliveryOutcome::from_reply(r))
            }
        }
    };
    let setup = Some(started.elapsed());
    let remote_mta = Some(c.label.clone());
    let remote_host = Some(c.name.clone());
    if let Err(e) = c.client.send_message(env, data) {
        let r = Reply::new(451, (4, 3, 0), format!("internal error: {e}"));
        c.close(&opts.timeouts).await;
        return DeliveryReport::all(n, DeliveryOutcome::Deferred(r));
    }
    let mut result = None;
    loop {
        match c.next_event(&opts.timeouts).await {
            Some(ClientEvent::Transaction(t)) => result = Some(t),
            Some(ClientEvent::Ready) if result.is_some() => break,
            Some(ClientEvent::Failed(_)) | None => break,
            Some(_) => {}
        }
    }
    let tls = c.client.tls_active();
    let tls_policy = Some(c.tls.label());
    release(c, key, opts).await;
    match result {
        Some(t) => DeliveryReport {
            recipients: t.recipients.into_iter().map(DeliveryOutcome::from_reply).collect(),
            remote_mta,
            remote_host,
            next_hop_dsn: t.next_hop_dsn,
            tls,
            tls_policy,
            setup,
        },
        None => {
            let r = Reply::new(421, (4, 4, 2), "session ended without a result");
            DeliveryReport::all(n, DeliveryOutcome::Deferred(r))
        }
    }
}

/// Delivers `data` (the message, header and body; LF or CRLF line endings)
/// for every recipient of `env` to `target`.
pub async fn deliver(target: &Target, env: &Envelope, data: &[u8], opts: &DeliveryOptions) -> DeliveryReport {
    match target {
        Target::Smtp(d) => deliver_session("smtp", &Endpoint::Net(d.clone()), env, data, opts).await,
        Target::Lmtp(LmtpEndpoint::Tcp(d)) => {
            let mut d = d.clone();
            d.mx = false;
            deliver_session("lmtp", &Endpoint::Net(d), env, data, opts).await
        }
        Target::Lmtp(LmtpEndpoint::Unix(p)) => {
            deliver_session("lmtp", &Endpoint::Unix(p.clone()), env, data, opts).await
        }
        Target::Maildir(p) | Target::Mbox(p) => {
            let maildir = matches!(target, Target::Maildir(_));
            let (p, env2, data) = (p.clone(), env.clone(), data.to_vec());
            let n = env.recipients.len();
            let res = tokio::task::spawn_blocking(move || {
                if maildir {
                    super::local::deliver_maildir_in(&p, &env2, &data).map(|_| ())
                } else {
                    super::local::deliver_mbox_in(&p, &env2, &data)
                }
            })
            .await;
            let outcome = match res {
                Ok(Ok(())) => DeliveryOutcome::Delivered(Reply::new(
                    250,
                    (2, 0, 0),
                    if maildir { "delivered to maildir" } else { "delivered to mailbox" },
                )),
                Ok(Err(e)) => DeliveryOutcome::from_reply(super::local::io_reply(&e)),
                Err(e) => DeliveryOutcome::Deferred(Reply::new(451, (4, 3, 0), format!("delivery task failed: {e}"))),
            };
            DeliveryReport {
                recipients: vec![outcome; n],
                remote_mta: None,
                remote_host: None,
                next_hop_dsn: false,
                tls: false,
                tls_policy: None,
                setup: None,
            }
        }
    }
}

/// Call-ahead (R27): asks `dest` whether it would take `rcpt` from `from`
/// (MAIL, RCPT, RSET; the session is cached for the next question when
/// [`DeliveryOptions::cache`] is set). Returns the RCPT reply, the MAIL
/// reply when MAIL was refused, or a made-up 4.4.x when the destination
/// could not be reached.
pub async fn call_ahead(dest: &Destination, from: &ReversePath, rcpt: &ForwardPath, opts: &DeliveryOptions) -> Reply {
    let endpoint = Endpoint::Net(dest.clone());
    let (mut c, key) = match open("smtp", &endpoint, opts).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    if let Err(e) = c.client.call_ahead(from, rcpt) {
        c.close(&opts.timeouts).await;
        return Reply::new(451, (4, 3, 0), format!("internal error: {e}"));
    }
    let mut answer = None;
    loop {
        match c.next_event(&opts.timeouts).await {
            Some(ClientEvent::CallAhead(r)) => answer = Some(r.answer().clone()),
            Some(ClientEvent::Ready) if answer.is_some() => break,
            Some(ClientEvent::Failed(_)) | None => break,
            Some(_) => {}
        }
    }
    release(c, key, opts).await;
    answer.unwrap_or_else(|| Reply::new(451, (4, 4, 2), "call-ahead session ended early"))
}

/// The address a [`Hop`] would connect to (for logs).
pub fn hop_label(h: &Hop) -> String {
    let a: SocketAddr = h.addr;
    format!("{}[{}]:{}", h.name, a.ip(), a.port())
}
