//! One SMTP session of the daemon: a socket (plain, STARTTLS-upgraded or implicit TLS)
//! driving a [`Conn`]. Every need of the connection is answered here: lookups from
//! [`Lookups`], SASL from [`SaslServer`], durable storage from the spool.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use mailpolicy_lang::ir::{Program, Resource};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::auth::AuthState;
use super::lookup::Lookups;
use super::sasl::{CredentialStore, SaslServer, Step as SaslStep, Verifier};
use super::{now_ms, ListenerRt, Shared, StoreFailure};
use crate::conn::{
    AuthKind, AuthQuery, AuthReport, ClientInfo, Conn, ContentReport, MethodReport, MilterCall, Need, Note,
    QueueFailure, QueuedMessage, SaslResult, Sign,
};
use crate::eval::{Answer, Request};
use crate::smtp::{PeerInfo, Reply, Time, TlsInfo};

enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    /// A local submission fed in-process by the maildrop pickup (`pickup.rs`).
    Local(tokio::io::DuplexStream),
    Gone,
}

/// Bytes a TLS client sent before the handshake began (they came with a load balancer's
/// PROXY header): the server connection takes them first, as if read from the socket. A
/// malformed start fails the handshake that follows (rustls keeps the error).
fn feed_tls(c: &mut rustls::ServerConnection, mut bytes: &[u8]) {
    while !bytes.is_empty() {
        match c.read_tls(&mut bytes) {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                if c.process_new_packets().is_err() {
                    break;
                }
            }
        }
    }
}

/// How a session's client reached us.
pub enum Incoming {
    /// A TCP client, and the bytes it sent after a PROXY protocol header (usually none).
    Tcp(TcpStream, Vec<u8>),
    /// A local submission by the operating system's user `user` (`mailc sendmail`): the
    /// session is authenticated as that user from the start (mechanism `local`).
    Local { stream: tokio::io::DuplexStream, user: String },
}

impl Stream {
    async fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf).await,
            Stream::Tls(s) => s.read(buf).await,
            Stream::Local(s) => s.read(buf).await,
            Stream::Gone => Ok(0),
        }
    }
    async fn write_all(&mut self, b: &[u8]) -> std::io::Result<()> {
        match self {
            Stream::Plain(s) => s.write_all(b).await,
            Stream::Tls(s) => s.write_all(b).await,
            Stream::Local(s) => s.write_all(b).await,
            Stream::Gone => Ok(()),
        }
    }
    async fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush().await,
            Stream::Tls(s) => s.flush().await,
            Stream::Local(s) => s.flush().await,
            Stream::Gone => Ok(()),
        }
    }
    async fn shutdown(&mut self) {
        let _ = match self {
            Stream::Plain(s) => s.shutdown().await,
            Stream::Tls(s) => s.shutdown().await,
            Stream::Local(s) => s.shutdown().await,
            Stream::Gone => Ok(()),
        };
    }
}

fn tls_info(conn: &rustls::ServerConnection) -> TlsInfo {
    let (version, cipher) = super::tls::describe(conn);
    TlsInfo {
        version,
        cipher,
        sni: conn.server_name().map(str::to_string),
        peer_certificate: conn.peer_certificates().and_then(|c| c.first()).map(|c| c.as_ref().to_vec()),
    }
}

/// Logins from the listener's credentials table (`login SCRAM-SHA-256$...`).
struct TableCredentials {
    lookups: Arc<Lookups>,
    table: Resource,
}

impl CredentialStore for TableCredentials {
    fn verifier(&self, login: &str) -> Option<Verifier> {
        match self.lookups.table_sync(&self.table, login) {
            Answer::Value(Some(v)) => Verifier::parse(&v),
            _ => None,
        }
    }
}

/// The read buffer between commands, and inside DATA/BDAT.
const SMALL_READ: usize = 4 * 1024;
const LARGE_READ: usize = 64 * 1024;

pub async fn run(
    shared: Arc<Shared>,
    lst: Arc<ListenerRt>,
    incoming: Incoming,
    remote: SocketAddr,
    local: SocketAddr,
    id: String,
) {
    let prog: Arc<Program> = shared.program();
    let lookups: Arc<Lookups> = shared.lookups();
    let log = shared.log;
    let (mut stream, local_user, early) = match incoming {
        Incoming::Tcp(tcp, early) => {
            let _ = tcp.set_nodelay(true);
            (Stream::Plain(tcp), None, early)
        }
        Incoming::Local { stream, user } => (Stream::Local(stream), Some(user), Vec::new()),
    };
    // Counted in `sessions_current` until the guard drops, on every path the session ends.
    let _counted = crate::metrics::get().session(&lst.name);
    let (client_name, client_ptr) = Box::pin(lookups.reverse(remote.ip())).await;
    log.event(
        "connect",
        &[("session", &id), ("listener", &lst.name), ("client", &remote.ip().to_string()), ("name", &client_name)],
    );

    let mut peer = PeerInfo { remote: Some(remote), local: Some(local), tls: None };
    let mut early = early;
    if lst.implicit_tls {
        let Some(acceptor) = lst.tls.clone() else { return };
        let Stream::Plain(tcp) = std::mem::replace(&mut stream, Stream::Gone) else { return };
        // The client speaks first here: what came with a PROXY header is its ClientHello.
        let hello = std::mem::take(&mut early);
        let accept = acceptor.accept_with(tcp, move |c| feed_tls(c, &hello));
        match Box::pin(tokio::time::timeout(Duration::from_secs(30), accept)).await {
            Ok(Ok(tls)) => {
                peer.tls = Some(tls_info(tls.get_ref().1));
                stream = Stream::Tls(Box::new(tls));
            }
            Ok(Err(e)) => {
                log.event(
                    "tls-failed",
                    &[("session", &id), ("client", &remote.ip().to_string()), ("error", &e.to_string())],
                );
                return;
            }
            Err(_) => {
                log.event("tls-failed", &[("session", &id), ("error", "handshake timed out")]);
                return;
            }
        }
    }
    // `client=NAME[IP]` of the summary line (Postfix's smtpd).
    let client_label =
        format!("{}[{}]", if client_name.is_empty() { "unknown" } else { client_name.as_str() }, remote.ip());
    let client = ClientInfo { name: client_name, ptr: client_ptr, listener: lst.name.clone(), session_id: id.clone() };
    let mut conn = Conn::new(prog.clone(), lst.engine.clone(), peer, client, Time(now_ms()));
    // The log names each verdict's rule; nothing here reads a stage's trace.
    conn.set_tracing(false);
    if !early.is_empty() {
        conn.handle_input(&early, Time(now_ms()));
    }
    conn.set_requirements(lst.require_tls, lst.require_auth);
    if let Some(user) = &local_user {
        conn.preauthenticate_local(user);
    }
    let credentials = lst
        .credentials
        .as_ref()
        .map(|t| Arc::new(TableCredentials { lookups: lookups.clone(), table: t.clone() }) as Arc<dyn CredentialStore>);
    let sasl = credentials.and_then(|c| SaslServer::new(c).ok());
    let session_keys = crate::eval::session_keys(remote.ip());
    // `concurrent by client.ip` / `client.network` counts this session until the guard
    // drops, on every path the session ends (a panic unwinding included).
    let count_guard = ConcurrencyGuard::open(lookups.clone(), session_keys);
    let milters = crate::milter::Milters::new(&conn);
    let shutdown = shared.shutdown.clone();
    let mut session = Session {
        shared,
        lst,
        prog,
        lookups,
        id,
        remote,
        client_label,
        local_user,
        stream,
        conn,
        sasl,
        auth: (0, AuthState::default()),
        spill: Spill::default(),
        milters,
        count_guard: Some(count_guard),
        counted: crate::state::Counted::default(),
        reply_line_start: true,
        pace: Pace {
            shutdown,
            buf: vec![0u8; SMALL_READ],
            last_input: tokio::time::Instant::now(),
            line_started: None,
            data_started: None,
            data_bytes: 0,
            closing_for_shutdown: false,
        },
    };
    session.reserve_id();
    Box::pin(session.serve()).await;
    session.milters.quit().await;
    session.stream.shutdown().await;
    session.spill.discard();
    // Released before the line that says the session ended, in memory and (published by
    // the store's one task, awaited up to `state_timeout`) on Redis; a panic releases it on
    // drop.
    if let Some(g) = session.count_guard.take() {
        g.release().await;
    }
    log.event("disconnect", &[("session", &session.id), ("client", &session.remote.ip().to_string())]);
}

/// One session: the socket, the engine's [`Conn`], and what the host keeps for it. The
/// loop ([`Session::serve`]) hands each [`Need`] to the method that answers it; none of
/// them decides anything about the protocol (what to count, refuse, add or sign is the
/// engine's), they fetch, compute, store and log.
struct Session {
    shared: Arc<Shared>,
    lst: Arc<ListenerRt>,
    prog: Arc<Program>,
    lookups: Arc<Lookups>,
    id: String,
    remote: SocketAddr,
    client_label: String,
    /// A local submission's user (the maildrop's owner).
    local_user: Option<String>,
    stream: Stream,
    conn: Conn,
    sasl: Option<SaslServer>,
    /// mail-auth's state of the engine's transaction of this number (`AuthQuery::transaction`).
    auth: (u64, AuthState),
    /// Message bytes past the in-memory bound, streamed to a file of the spool's.
    spill: Spill,
    milters: crate::milter::Milters,
    /// `concurrent by client.ip` / `client.network` counts this session until the guard
    /// drops, on every path the session ends (a panic unwinding included).
    count_guard: Option<ConcurrencyGuard>,
    /// The counts the current stage's event answered (`StateStore::record`).
    counted: crate::state::Counted,
    reply_line_start: bool,
    pace: Pace,
}

/// The session's clocks and read buffer.
struct Pace {
    shutdown: tokio::sync::watch::Receiver<bool>,
    /// Commands are short: an idle session holds a small read buffer, and a message phase
    /// a large one (memory per session stays small with thousands of clients waiting).
    buf: Vec<u8>,
    last_input: tokio::time::Instant,
    /// When the current command line began, and when the message phase began (with the
    /// byte count then), for the per-request deadlines.
    line_started: Option<tokio::time::Instant>,
    data_started: Option<(tokio::time::Instant, u64)>,
    data_bytes: u64,
    closing_for_shutdown: bool,
}

/// Whether the session goes on after a step.
type Go = Result<(), ()>;

impl Session {
    async fn serve(&mut self) {
        loop {
            // 1. Everything the connection needs.
            while let Some(need) = self.conn.poll_need(Time(now_ms())) {
                let go = match need {
                    Need::Policy(req) => Box::pin(self.policy(req)).await,
                    Need::AuthStep { mechanism, data } => self.auth_step(&mechanism, data.as_deref()),
                    Need::FailedLogins { key, window_ms } => self.failed_logins(&key, window_ms),
                    Need::LoginKnown { login, ip, window_ms } => self.login_known(&login, ip, window_ms),
                    Need::SenderAuth(q) => Box::pin(self.sender_auth(q)).await,
                    Need::StartTls => Box::pin(self.start_tls()).await,
                    Need::Sign(sign) => Box::pin(self.sign(sign)).await,
                    Need::Queue(msg) => Box::pin(self.queue(msg)).await,
                    Need::ProxyFilter(call) => Box::pin(self.proxy_filter(call)).await,
                    Need::Milter(call) => Box::pin(self.milter(call)).await,
                    Need::Note(n) => Box::pin(self.note(n)).await,
                };
                if go.is_err() {
                    return;
                }
            }
            // A message that was decided (stored or refused) needs its spill no more.
            if self.spill.file.is_some() && !self.conn.session().message_open() {
                self.spill.discard();
            }
            // 2. Write what the engine produced.
            if self.transmit().await.is_err() || self.conn.is_closed() {
                return;
            }
            // 3. Wait for input, a timer, or shutdown.
            if Box::pin(self.wait()).await.is_err() {
                return;
            }
        }
    }

    /// Write out what the engine produced.
    async fn transmit(&mut self) -> Go {
        let mut wrote = false;
        while let Some(b) = self.conn.poll_transmit() {
            wrote = true;
            crate::metrics::get().replies_in(&self.lst.name, &b, &mut self.reply_line_start);
            self.stream.write_all(&b).await.map_err(|_| ())?;
        }
        if wrote {
            self.stream.flush().await.map_err(|_| ())?;
        }
        Ok(())
    }

    /// A lookup, a content scan: answered from the network, the tables and the state.
    async fn policy(&mut self, req: Request) -> Go {
        // Counted already by this stage's event, in its round trip.
        if let Some(n) = self.counted.take(&req) {
            self.conn.answer(req, Answer::Count(n));
            return Ok(());
        }
        let a = match &req {
            Request::Scan { scanner } => match (self.prog.scanners.get(scanner.index()), self.conn.current_message()) {
                (Some(sc), Some(data)) => {
                    let whole = Box::pin(self.spill.whole(data, &self.shared)).await;
                    let data = whole.as_ref().map(|(_, w)| w.as_slice()).unwrap_or(data);
                    let started = std::time::Instant::now();
                    let a = Box::pin(super::scan::scan(sc, data, self.conn.facts())).await;
                    crate::metrics::get().lookup("scanner", started.elapsed());
                    a
                }
                _ => Answer::Error("no message to scan".into()),
            },
            _ => match self.lookups.answer_now(&req, now_ms()) {
                Some(a) => a,
                None => Box::pin(self.lookups.answer(&self.prog, &req, now_ms())).await,
            },
        };
        self.conn.answer(req, a);
        Ok(())
    }

    /// One SASL step with rsasl; the engine throttled before and decides after.
    fn auth_step(&mut self, mechanism: &str, data: Option<&[u8]>) -> Go {
        let now = Time(now_ms());
        let Some(s) = self.sasl.as_mut() else {
            self.conn.sasl_done(mechanism, SaslResult::Failure { login: None }, now);
            return Ok(());
        };
        match s.step(mechanism, data) {
            SaslStep::Continue(ch) => self.conn.auth_continue(&ch, now),
            SaslStep::Success(user) => {
                s.reset();
                self.conn.sasl_done(mechanism, SaslResult::Success { user }, now);
            }
            SaslStep::Failure => {
                let login = s.tried_login();
                s.reset();
                self.conn.sasl_done(mechanism, SaslResult::Failure { login }, now);
            }
        }
        Ok(())
    }

    /// This host's count (the AUTH throttles are per host, spec/language.md 5.2).
    fn failed_logins(&mut self, key: &str, window_ms: u64) -> Go {
        let now = now_ms();
        let counter = mailpolicy_lang::ir::Counter::AuthFailures.name();
        let n = self.lookups.state.local.rates.lock().map(|r| r.count(counter, key, window_ms, now)).unwrap_or(0);
        self.conn.failed_logins(n, Time(now));
        Ok(())
    }

    fn login_known(&mut self, login: &str, ip: std::net::IpAddr, window_ms: u64) -> Go {
        let now = now_ms();
        self.conn.login_known(self.shared.auth_known_from(login, ip, now, window_ms), Time(now));
        Ok(())
    }

    /// SPF, or DKIM and DMARC over the message, with mail-auth.
    async fn sender_auth(&mut self, q: AuthQuery) -> Go {
        if self.auth.0 != q.transaction {
            self.auth = (q.transaction, AuthState::default());
        }
        let sa = &self.lookups.sender_auth;
        let st = &mut self.auth.1;
        let report = match q.kind {
            AuthKind::Spf => AuthReport::Spf(Box::pin(sa.spf(st, q.client_ip, &q.helo, &q.sender)).await.to_string()),
            AuthKind::Content => match self.conn.current_message() {
                Some(m) => {
                    let whole = Box::pin(self.spill.whole(m, &self.shared)).await;
                    let m = whole.as_ref().map(|(_, w)| w.as_slice()).unwrap_or(m);
                    AuthReport::Content(Box::pin(sa.content(st, q.client_ip, &q.helo, &q.sender, m)).await)
                }
                None => AuthReport::Content(ContentReport {
                    dkim: vec![MethodReport::word("temperror")],
                    dmarc: MethodReport::word("temperror"),
                    dmarc_policy: String::new(),
                }),
            },
        };
        self.conn.sender_auth_checked(report);
        Ok(())
    }

    /// Flush the 220, then hand the socket to TLS.
    async fn start_tls(&mut self) -> Go {
        self.transmit().await?;
        let (Some(acceptor), Stream::Plain(tcp)) =
            (self.lst.tls.clone(), std::mem::replace(&mut self.stream, Stream::Gone))
        else {
            return Err(());
        };
        let log = self.shared.log;
        match Box::pin(tokio::time::timeout(Duration::from_secs(30), acceptor.accept(tcp))).await {
            Ok(Ok(tls)) => {
                let info = tls_info(tls.get_ref().1);
                log.event("starttls", &[("session", &self.id), ("version", &info.version), ("cipher", &info.cipher)]);
                self.stream = Stream::Tls(Box::new(tls));
                if let Some(s) = self.sasl.as_mut() {
                    s.reset();
                }
                self.conn.tls_established(info, Time(now_ms()));
                Ok(())
            }
            Ok(Err(e)) => {
                let client = self.remote.ip().to_string();
                log.event("tls-failed", &[("session", &self.id), ("client", &client), ("error", &e.to_string())]);
                Err(())
            }
            Err(_) => {
                log.event("tls-failed", &[("session", &self.id), ("error", "handshake timed out")]);
                Err(())
            }
        }
    }

    /// The DKIM signature the engine asked for, over the whole message (the part spilled
    /// to disk included).
    async fn sign(&mut self, sign: Sign) -> Go {
        let log = self.shared.log;
        let mut field = None;
        if let (Some(signer), Some((head, tail))) = (self.lookups.signer.as_ref(), self.conn.sealing_message()) {
            let whole = if tail > 0 { Box::pin(self.spill.whole(head, &self.shared)).await } else { None };
            let data = match (&whole, tail) {
                (Some((_, w)), _) => Some(w.as_slice()),
                (None, 0) => Some(head),
                (None, _) => None,
            };
            match data.map(|d| signer.sign(d, &sign.domain)) {
                Some(Ok(h)) => field = Some(h),
                Some(Err(e)) => log.event("dkim-sign-failed", &[("session", &self.id), ("error", &e)]),
                None => log.event(
                    "dkim-sign-failed",
                    &[("session", &self.id), ("error", "the spilled message could not be read")],
                ),
            }
        }
        self.conn.signed(field.as_deref());
        Ok(())
    }

    /// Make the message durable in the spool.
    async fn queue(&mut self, msg: QueuedMessage) -> Go {
        let log = self.shared.log;
        let id = self.id.clone();
        if !self.shared.qmgr_up() {
            // Accept nothing that would go nowhere: the queue manager is down (its
            // supervisor is restarting it).
            log.event("store-refused", &[("session", &id), ("reason", "queue manager down")]);
            self.conn.queue_failed(QueueFailure::QueueManagerDown, Time(now_ms()));
            return Ok(());
        }
        super::fault::check("session", &msg.data);
        // The message moves to the blocking pool and back: no copy of its data.
        let store = self.shared.store.clone();
        let tail = if msg.tail > 0 { self.spill.file_for_store() } else { Ok(None) };
        let reserved = self.conn.next_queue_id().map(str::to_string);
        let joined = tokio::task::spawn_blocking(move || {
            let r = match tail {
                Ok(t) => store.store_as(reserved.as_deref(), &msg, t.as_deref()),
                Err(e) => Err(e),
            };
            (r, msg)
        })
        .await;
        self.spill.discard();
        let now = Time(now_ms());
        let (stored, msg) = match joined {
            Ok((r, m)) => (Ok(r), m),
            Err(e) => (Err(e), Default::default()),
        };
        // R12: the peer holds a copy before the client hears 250 (`backup_peer`).
        let refused = match &stored {
            Ok(Ok(qid)) => backup_copy(&self.shared, &id, qid).await,
            _ => false,
        };
        match stored {
            _ if refused => self.conn.queue_failed(QueueFailure::BackupFailed, now),
            Ok(Ok(qid)) => {
                self.log_queued(&qid, &msg);
                self.conn.queued(&qid, now);
                self.reserve_id();
                self.shared.enqueued(&qid);
            }
            Ok(Err(StoreFailure::Full)) => {
                log.event("store-failed", &[("session", &id), ("error", "no space left")]);
                self.conn.queue_failed(QueueFailure::Full, now);
            }
            Ok(Err(StoreFailure::Io(e))) => {
                log.event("store-failed", &[("session", &id), ("error", &e)]);
                self.conn.queue_failed(QueueFailure::LocalError, now);
            }
            Err(e) => {
                log.event("store-failed", &[("session", &id), ("error", &e.to_string())]);
                self.conn.queue_failed(QueueFailure::LocalError, now);
            }
        }
        Ok(())
    }

    /// The event and Postfix's lines for a message queued: smtpd's (or pickup's) and qmgr's.
    fn log_queued(&self, qid: &str, msg: &QueuedMessage) {
        let log = self.shared.log;
        let rcpts: Vec<&str> = msg.recipients.iter().map(|r| r.address.as_str()).collect();
        log.event(
            "queued",
            &[
                ("session", &self.id),
                ("id", qid),
                ("from", &msg.sender),
                ("to", &rcpts.join(",")),
                ("size", &msg.data.len().to_string()),
                ("hold", msg.hold.as_deref().unwrap_or("")),
            ],
        );
        let sev = crate::log::Severity::Info;
        match &self.local_user {
            Some(user) => log.summary("pickup", sev, qid, &format!("uid={} from=<{}>", uid_of(user), msg.sender)),
            None => log.summary("smtpd", sev, qid, &format!("client={}", self.client_label)),
        }
        log.summary(
            "qmgr",
            sev,
            qid,
            &format!(
                "from=<{}>, size={}, nrcpt={} (queue active)",
                msg.sender,
                msg.data.len() as u64 + msg.tail,
                msg.recipients.len()
            ),
        );
    }

    /// Milters know a message's queue id from MAIL on (`i`), as Postfix's do.
    fn reserve_id(&mut self) {
        if !self.conn.milters().is_empty() {
            if let Some(id) = self.shared.store.reserve_id() {
                self.conn.set_next_queue_id(id);
            }
        }
    }

    /// The listener's before-queue filter (`proxy_filter`): the filter's reply is the client's.
    async fn proxy_filter(&mut self, call: mailpolicy_engine::before_queue::FilterCall) -> Go {
        let whole = match call.message.tail {
            1.. => Box::pin(self.spill.whole(&call.message.data, &self.shared)).await.map(|(_, w)| w),
            0 => None,
        };
        let timeout = self.prog.listener_or_default(Some(&self.lst.name)).proxy_filter_timeout;
        let host = &self.lst.engine.hostname;
        let outcome = crate::before_queue::filter(&self.shared, host, timeout, &self.id, &call, whole).await;
        self.spill.discard();
        self.conn.proxied(&outcome, Time(now_ms()));
        Ok(())
    }

    /// The policy's milters on this stage.
    async fn milter(&mut self, call: MilterCall) -> Go {
        let whole = match (call.spilled, self.conn.current_message()) {
            (1.., Some(m)) => Box::pin(self.spill.whole(m, &self.shared)).await,
            _ => None,
        };
        let answers = Box::pin(self.milters.call(&self.conn, &call, whole.as_ref().map(|(_, w)| w.as_slice()))).await;
        self.conn.milter_replied(answers, Time(now_ms()));
        Ok(())
    }

    /// Log, count, alert, record a login.
    async fn note(&mut self, n: Note) -> Go {
        let (shared, id) = (&self.shared, self.id.as_str());
        match n {
            Note::Verdict { stage, outcome, rule, .. } => {
                self.counted.clear();
                refusal_line(shared, stage.name(), &outcome, &self.client_label, self.conn.facts());
                let rule = rule.map(|r| self.prog.describe_loc(r)).unwrap_or_else(|| "default".into());
                crate::metrics::get().verdict(stage.name(), crate::metrics::outcome_kind(&outcome), &rule);
                shared.log.event(
                    "verdict",
                    &[("session", id), ("stage", stage.name()), ("outcome", &outcome), ("rule", &rule)],
                );
            }
            Note::Log(text) => shared.log.event("policy-log", &[("session", id), ("text", &text)]),
            Note::Alert { to, text, every_ms } => shared.alert(&to, &text, every_ms).await,
            // Recorded before the stage's own lookups are answered: a session counts itself
            // first, so hosts racing on one shared window never accept past its limit together.
            Note::Count { counter, keys } => {
                // The answer carries the stage's counts.
                self.counted.absorb(self.lookups.state.record(counter.name(), &keys, now_ms()).await);
            }
            Note::Login { mechanism, login, ok: true, .. } => {
                let user = login.unwrap_or_default();
                shared.auth_succeeded(&user, crate::conn::canonical(self.remote.ip()), now_ms());
                shared.log.event("auth", &[("session", id), ("user", &user), ("mechanism", &mechanism)]);
            }
            Note::Login { mechanism, login, throttled, .. } => shared.log.event(
                "auth-failed",
                &[
                    ("session", id),
                    ("client", &self.remote.ip().to_string()),
                    ("mechanism", &mechanism),
                    ("login", login.as_deref().unwrap_or("")),
                    ("throttled", throttled),
                ],
            ),
        }
        Ok(())
    }

    /// Wait for input, a timer, or shutdown; hand what came to the engine.
    async fn wait(&mut self) -> Go {
        let (lst, p) = (&self.lst, &mut self.pace);
        let engine_deadline = self.conn.poll_timeout().map(|t| {
            let now = now_ms();
            tokio::time::Instant::now() + Duration::from_millis(t.0.saturating_sub(now))
        });
        // The idle time-out of the phase the client is in (R46): DATA gets its own. Under
        // pressure (most slots taken) every time-out shrinks to STRESS_TIMEOUT.
        let stress = self.shared.under_pressure();
        let eff = |t: Duration| if stress { t.min(super::STRESS_TIMEOUT) } else { t };
        let in_message = self.conn.session().in_message();
        let idle_deadline = p.last_input + eff(if in_message { lst.data_timeout } else { lst.command_timeout });
        // Deadlines for a whole request, however the client paces its bytes (Postfix
        // smtpd_per_request_deadline): a command line within command_timeout of its first
        // byte; the whole DATA/BDAT phase within data_timeout plus one second per 500
        // bytes received (smtpd_min_data_rate).
        if in_message {
            p.line_started = None;
            p.data_started.get_or_insert((tokio::time::Instant::now(), p.data_bytes));
        } else {
            p.data_started = None;
            if self.conn.session().partial_input() {
                p.line_started.get_or_insert(tokio::time::Instant::now());
            } else {
                p.line_started = None;
            }
        }
        let request_deadline = match (p.line_started, p.data_started) {
            (Some(t), _) => Some(t + eff(lst.command_timeout)),
            (None, Some((t, bytes0))) => Some(
                t + eff(lst.data_timeout)
                    + Duration::from_millis(p.data_bytes.saturating_sub(bytes0).saturating_mul(2)),
            ),
            _ => None,
        };
        let limit = request_deadline.map_or(idle_deadline, |r| r.min(idle_deadline));
        let deadline = engine_deadline.map_or(limit, |d| d.min(limit));
        let want = if p.data_started.is_some() { LARGE_READ } else { SMALL_READ };
        if p.buf.len() != want {
            p.buf = vec![0u8; want];
        }
        let room = self.conn.input_room().clamp(1, p.buf.len());
        let conn = &mut self.conn;
        tokio::select! {
            r = self.stream.read(&mut p.buf[..room]) => match r {
                Ok(0) | Err(_) => {
                    conn.handle_eof(Time(now_ms()));
                    let _ = conn.poll_need(Time(now_ms()));
                    return Err(());
                }
                Ok(n) => {
                    p.last_input = tokio::time::Instant::now();
                    self.counted.clear();
                    p.data_bytes += n as u64;
                    conn.set_free_space(self.shared.spool_free());
                    conn.handle_input(&p.buf[..n], Time(now_ms()));
                    if let Some((seq, bytes)) = conn.take_spill() {
                        self.spill.write(seq, &bytes, &self.shared, &self.id);
                    }
                }
            },
            _ = tokio::time::sleep_until(deadline) => {
                let now_i = tokio::time::Instant::now();
                if now_i >= limit {
                    let why = if now_i >= idle_deadline { "idle" } else { "request deadline" };
                    self.shared.log.event(
                        "timeout",
                        &[("session", &self.id), ("client", &self.remote.ip().to_string()), ("kind", why), ("stress", if stress { "yes" } else { "" })],
                    );
                    conn.shutdown(Some(Reply::new(421, (4, 4, 2), "Timeout exceeded, closing connection")), Time(now_ms()));
                } else {
                    conn.handle_timeout(Time(now_ms()));
                }
            },
            _ = p.shutdown.changed(), if !p.closing_for_shutdown => {
                p.closing_for_shutdown = true;
                conn.shutdown(Some(Reply::new(421, (4, 3, 2), "Server shutting down, try again later")), Time(now_ms()));
            },
        }
        Ok(())
    }
}

/// A copy of the stored message `qid` held by the backup peer before the 250 (R12,
/// `backup_peer`, spec/language.md section 5.5). True when the message is refused without
/// one (`backup_on_error tempfail`, [`QueueFailure::BackupFailed`]): the stored message is
/// then removed, so the client's retry is the only copy. Accepted without one, its copy is
/// retried later (`backup::recopy`).
async fn backup_copy(shared: &Shared, session: &str, qid: &str) -> bool {
    let Some(b) = shared.backup.get() else { return false };
    let Some(peer) = b.peer.map(|p| p.to_string()) else { return false };
    let log = &shared.log;
    // Held until the message is kept or removed: no retry copies it meanwhile.
    let _claim = b.claim(qid);
    match b.shadow(qid).await {
        Ok(()) => {
            log.event("shadowed", &[("session", session), ("id", qid), ("peer", &peer)]);
            false
        }
        Err(e) if !b.tempfail => {
            log.event(
                "shadow-failed",
                &[
                    ("session", session),
                    ("id", qid),
                    ("peer", &peer),
                    ("error", &e),
                    ("action", "accepted without a copy"),
                ],
            );
            b.retry_later();
            false
        }
        Err(e) => {
            log.event(
                "shadow-failed",
                &[("session", session), ("id", qid), ("peer", &peer), ("error", &e), ("action", "tempfail")],
            );
            b.discard(qid).await;
            true
        }
    }
}

/// The spill file of the message being received: what the engine hands out past its
/// in-memory bound (`Session::take_spill`) is written here as it arrives, and the spool
/// copies it after the in-memory part when it stores the message. Removed on drop.
#[derive(Default)]
struct Spill {
    /// (message number, path, file, bytes written)
    file: Option<(u64, std::path::PathBuf, std::fs::File, u64)>,
    failed: Option<StoreFailure>,
}

impl Spill {
    fn write(&mut self, seq: u64, bytes: &[u8], shared: &Shared, session: &str) {
        use std::io::Write;
        if self.file.as_ref().is_some_and(|f| f.0 != seq) {
            self.discard();
        }
        if self.failed.is_some() {
            return;
        }
        if self.file.is_none() {
            let path = shared.store.spill_path(session);
            match std::fs::OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(f) => self.file = Some((seq, path, f, 0)),
                Err(e) => {
                    self.failed = Some(failure(&e));
                    return;
                }
            }
        }
        if let Some((_, _, f, n)) = self.file.as_mut() {
            match f.write_all(bytes) {
                Ok(()) => *n += bytes.len() as u64,
                Err(e) => self.failed = Some(failure(&e)),
            }
        }
    }

    /// The file to store from (flushed), or why it cannot be.
    fn file_for_store(&mut self) -> Result<Option<std::path::PathBuf>, StoreFailure> {
        if let Some(f) = self.failed.take() {
            return Err(f);
        }
        Ok(self.file.as_ref().map(|f| f.1.clone()))
    }

    /// The whole message (`head` then the spill), read back for a check that needs all of
    /// it (DKIM, DMARC, content scanners, DKIM signing), one large message at a time
    /// daemon-wide so memory stays bounded. None when nothing was spilled.
    async fn whole(&self, head: &[u8], shared: &Shared) -> Option<(tokio::sync::OwnedSemaphorePermit, Vec<u8>)> {
        let (_, path, _, n) = self.file.as_ref()?;
        let permit = shared.whole_message.clone().acquire_owned().await.ok()?;
        let mut v = Vec::with_capacity(head.len() + *n as usize);
        v.extend_from_slice(head);
        let path = path.clone();
        let rest = tokio::task::spawn_blocking(move || std::fs::read(path)).await.ok()?.ok()?;
        v.extend_from_slice(&rest);
        Some((permit, v))
    }

    fn discard(&mut self) {
        if let Some((_, path, _, _)) = self.file.take() {
            let _ = std::fs::remove_file(path);
        }
        self.failed = None;
    }
}

impl Drop for Spill {
    fn drop(&mut self) {
        self.discard();
    }
}

fn failure(e: &std::io::Error) -> StoreFailure {
    match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => StoreFailure::Full,
        _ => StoreFailure::Io(e.to_string()),
    }
}

/// One session's share of its client's `concurrent` count, released on drop (a panic
/// unwinding included). With a shared store the host's counts are published by the store
/// ([`crate::state::StateStore::session`]): opening and closing cost the session no round
/// trip, and its own `concurrent` questions write its host's count in their script.
struct ConcurrencyGuard {
    lookups: Arc<Lookups>,
    keys: Vec<String>,
}

impl ConcurrencyGuard {
    fn open(lookups: Arc<Lookups>, keys: Vec<String>) -> ConcurrencyGuard {
        lookups.state.session(&keys, true);
        ConcurrencyGuard { lookups, keys }
    }

    /// The session's end: its counts go from memory at once and from the shared store
    /// before this returns (the store's publisher writes them; awaited up to
    /// `state_timeout`), so a session logged `disconnect` no longer counts on any host.
    /// [`Drop`] is the fallback for the paths that never get here (a panic).
    async fn release(mut self) {
        let keys = std::mem::take(&mut self.keys);
        if let Some(version) = self.lookups.state.session(&keys, false) {
            self.lookups.state.published(version).await;
        }
    }
}

impl Drop for ConcurrencyGuard {
    fn drop(&mut self) {
        // A poisoned lock still holds the counts: release ours all the same. Nothing is
        // left here once `release` ran (the keys are gone with it).
        if !self.keys.is_empty() {
            self.lookups.state.session(&self.keys, false);
        }
    }
}

/// Postfix smtpd's line for a refusal, `NOQUEUE: reject: RCPT from NAME[IP]: REPLY;
/// from=<S> to=<R> proto=ESMTP helo=<H>`, which log tooling counts as a rejection.
fn refusal_line(shared: &Shared, stage: &str, outcome: &str, client: &str, f: &crate::eval::Facts) {
    let Some(reply) = outcome.strip_prefix("reject ").or_else(|| outcome.strip_prefix("tempfail ")) else {
        return;
    };
    let cmd = match stage {
        "connect" => "CONNECT",
        "helo" => "EHLO",
        "auth" => "AUTH",
        "mail" => "MAIL",
        "rcpt" => "RCPT",
        "data" => "END-OF-MESSAGE",
        other => other,
    };
    let mut text = format!("reject: {cmd} from {client}: {reply}");
    let mut sep = "; ";
    if let Some(s) = &f.sender {
        text.push_str(&format!("{sep}from=<{s}>"));
        sep = " ";
    }
    if let Some(r) = &f.recipient {
        text.push_str(&format!("{sep}to=<{}>", r.address));
        sep = " ";
    }
    if let Some((h, _)) = &f.helo {
        text.push_str(&format!("{sep}proto=ESMTP helo=<{h}>"));
    }
    shared.log.summary("smtpd", crate::log::Severity::Info, "NOQUEUE", &text);
}

/// The uid of a login, for pickup's summary line (the name itself when it has none).
fn uid_of(user: &str) -> String {
    let Ok(c) = std::ffi::CString::new(user) else { return user.to_string() };
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 4096];
    let mut out: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: getpwnam_r writes into `pw` and `buf` (its length given) and sets `out` to
    // `&mut pw` or null; only pw_uid is read.
    let r = unsafe { libc::getpwnam_r(c.as_ptr(), &mut pw, buf.as_mut_ptr(), buf.len(), &mut out) };
    if r == 0 && !out.is_null() {
        pw.pw_uid.to_string()
    } else {
        user.to_string()
    }
}

/// Idle timeout of a listener.
pub fn command_timeout(prog: &Program, listener: Option<&str>) -> Duration {
    prog.listener_or_default(listener).command_timeout
}

/// Idle time-out inside DATA/BDAT of a listener (`data_timeout`, default 10 minutes).
pub fn data_timeout(prog: &Program, listener: Option<&str>) -> Duration {
    prog.listener_or_default(listener).data_timeout
}
