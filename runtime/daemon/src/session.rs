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
use crate::conn::{ClientInfo, Conn, Need, Note};
use crate::eval::AuthCheck;
use crate::eval::{Answer, RenderedReply};
use crate::smtp::{AuthOutcome, PeerInfo, Reply, Time, TlsInfo};

enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    /// A local submission fed in-process by the maildrop pickup (`pickup.rs`).
    Local(tokio::io::DuplexStream),
    Gone,
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

/// Too many failed logins from one address in ten minutes: refuse AUTH for a while.
const AUTH_FAILURE_LIMIT: u64 = 10;
const AUTH_FAILURE_WINDOW: u64 = 600_000;
/// Too many failed logins for one account in ten minutes, from any addresses (a guessing
/// attack spread over many): AUTH for that login is refused with 454 4.7.0, whatever the
/// password, except from addresses it authenticated from in the last 30 days.
const LOGIN_FAILURE_LIMIT: u64 = 10;
const LOGIN_KNOWN_WINDOW: u64 = 30 * 86_400_000;

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
    let mut reply_line_start = true;
    let (client_name, client_ptr) = Box::pin(lookups.reverse(remote.ip())).await;
    log.event(
        "connect",
        &[("session", &id), ("listener", &lst.name), ("client", &remote.ip().to_string()), ("name", &client_name)],
    );

    let mut peer = PeerInfo { remote: Some(remote), local: Some(local), tls: None };
    if lst.implicit_tls {
        let Some(acceptor) = lst.tls.clone() else { return };
        let Stream::Plain(tcp) = std::mem::replace(&mut stream, Stream::Gone) else { return };
        match Box::pin(tokio::time::timeout(Duration::from_secs(30), acceptor.accept(tcp))).await {
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
    let mut sasl = credentials.and_then(|c| SaslServer::new(c).ok());
    let ip_key = format!("client.ip={}", remote.ip());
    let session_keys = crate::eval::session_keys(remote.ip());
    // `concurrent by client.ip` / `client.network` counts this session until the guard
    // drops, on every path the session ends (a panic unwinding included).
    let _count = ConcurrencyGuard::open(lookups.clone(), session_keys, &id).await;
    let mut auth_state = AuthState::default();
    let mut auth_sender: Option<String> = None;
    let mut shutdown = shared.shutdown.clone();
    // Commands are short: an idle session holds a small read buffer, and a message phase a
    // large one (memory per session stays small with thousands of clients waiting).
    let mut buf = vec![0u8; SMALL_READ];
    let mut last_input = tokio::time::Instant::now();
    // Message bytes past the in-memory bound, streamed to a file of the spool's.
    let mut spill = Spill::default();
    // When the current command line began, and when the message phase began (with the
    // byte count then), for the per-request deadlines.
    let mut line_started: Option<tokio::time::Instant> = None;
    let mut data_started: Option<(tokio::time::Instant, u64)> = None;
    let mut data_bytes: u64 = 0;
    let mut closing_for_shutdown = false;
    let mut milters = crate::milter::Milters::new(&conn);
    // Milters know a message's queue id from MAIL on (`i`), as Postfix's do.
    let reserve = |conn: &mut Conn| {
        if !conn.milters().is_empty() {
            if let Some(id) = shared.store.reserve_id() {
                conn.set_next_queue_id(id);
            }
        }
    };
    reserve(&mut conn);
    'session: loop {
        // 1. Everything the connection needs.
        while let Some(need) = conn.poll_need(Time(now_ms())) {
            match need {
                Need::Policy(req) => {
                    let a = match &req {
                        crate::eval::Request::Auth(check) => {
                            let f = conn.facts();
                            let (ip, sender) = (f.client_ip, f.sender.clone().unwrap_or_default());
                            let helo = f.helo.as_ref().map(|h| h.0.clone()).unwrap_or_default();
                            if auth_sender.as_deref() != Some(sender.as_str()) {
                                auth_state = AuthState::default();
                                auth_sender = Some(sender.clone());
                            }
                            let sa = &lookups.sender_auth;
                            match check {
                                AuthCheck::Spf => Answer::Value(Some(
                                    Box::pin(sa.spf(&mut auth_state, ip, &helo, &sender)).await.to_string(),
                                )),
                                _ => match conn.current_message() {
                                    Some(m) => {
                                        let whole = Box::pin(spill.whole(m, &shared)).await;
                                        let m = whole.as_ref().map(|(_, w)| w.as_slice()).unwrap_or(m);
                                        let (d, dm, p) =
                                            Box::pin(sa.content(&mut auth_state, ip, &helo, &sender, m)).await;
                                        Answer::Value(Some(match check {
                                            AuthCheck::Dkim => d,
                                            AuthCheck::Dmarc => dm,
                                            _ => p,
                                        }))
                                    }
                                    None => Answer::Error("no message to check".into()),
                                },
                            }
                        }
                        crate::eval::Request::Scan { scanner } => {
                            match (prog.scanners.get(scanner.index()), conn.current_message()) {
                                (Some(sc), Some(data)) => {
                                    let whole = Box::pin(spill.whole(data, &shared)).await;
                                    let data = whole.as_ref().map(|(_, w)| w.as_slice()).unwrap_or(data);
                                    let started = std::time::Instant::now();
                                    let a = Box::pin(super::scan::scan(sc, data, conn.facts())).await;
                                    crate::metrics::get().lookup("scanner", started.elapsed());
                                    a
                                }
                                _ => Answer::Error("no message to scan".into()),
                            }
                        }
                        _ => Box::pin(lookups.answer(&prog, &req, now_ms())).await,
                    };
                    conn.answer(req, a);
                }
                Need::AuthStep { mechanism, data } => {
                    let now = Time(now_ms());
                    let throttled = lookups
                        .state
                        .local
                        .rates
                        .lock()
                        .map(|r| r.count("auth_failures", &ip_key, AUTH_FAILURE_WINDOW, now.0) >= AUTH_FAILURE_LIMIT)
                        .unwrap_or(false);
                    let Some(s) = sasl.as_mut().filter(|_| !throttled) else {
                        let reply = throttled
                            .then(|| Reply::new(454, (4, 7, 0), "Too many failed authentications, try again later"));
                        conn.auth_done(AuthOutcome::Failure { reply }, now);
                        continue;
                    };
                    let step = s.step(&mechanism, data.as_deref());
                    // Per-login throttling: a login with too many recent failures, tried from
                    // an address it never authenticated from, is refused like a failure.
                    let login = s.tried_login().map(|l| l.to_ascii_lowercase());
                    let ip = crate::conn::canonical(remote.ip());
                    let login_key = login.as_ref().map(|l| format!("auth.login={l}"));
                    let login_blocked = login_key.as_ref().is_some_and(|k| {
                        let n = lookups
                            .state
                            .local
                            .rates
                            .lock()
                            .map(|r| r.count("auth_failures", k, AUTH_FAILURE_WINDOW, now.0))
                            .unwrap_or(0);
                        n >= LOGIN_FAILURE_LIMIT
                            && !login.as_ref().is_some_and(|l| shared.auth_known_from(l, ip, now.0, LOGIN_KNOWN_WINDOW))
                    });
                    match step {
                        SaslStep::Continue(ch) => conn.auth_continue(&ch, now),
                        SaslStep::Success(user) if !login_blocked => {
                            shared.auth_succeeded(&user, ip, now.0);
                            log.event("auth", &[("session", &id), ("user", &user), ("mechanism", &mechanism)]);
                            conn.auth_done(AuthOutcome::Success { user }, now);
                        }
                        SaslStep::Success(_) | SaslStep::Failure => {
                            s.reset();
                            if let Ok(mut r) = lookups.state.local.rates.lock() {
                                r.record("auth_failures", &ip_key, now.0);
                                if let Some(k) = &login_key {
                                    r.record("auth_failures", k, now.0);
                                }
                            }
                            log.event(
                                "auth-failed",
                                &[
                                    ("session", &id),
                                    ("client", &remote.ip().to_string()),
                                    ("mechanism", &mechanism),
                                    ("login", login.as_deref().unwrap_or("")),
                                    ("throttled", if login_blocked { "login" } else { "" }),
                                ],
                            );
                            let reply = login_blocked.then(|| {
                                Reply::new(454, (4, 7, 0), "Too many failed authentications, try again later")
                            });
                            conn.auth_done(AuthOutcome::Failure { reply }, now);
                        }
                    }
                }
                Need::StartTls => {
                    // Flush the 220 first, then hand the socket to TLS.
                    while let Some(b) = conn.poll_transmit() {
                        crate::metrics::get().replies_in(&lst.name, &b, &mut reply_line_start);
                        if stream.write_all(&b).await.is_err() {
                            break 'session;
                        }
                    }
                    let _ = stream.flush().await;
                    let (Some(acceptor), Stream::Plain(tcp)) =
                        (lst.tls.clone(), std::mem::replace(&mut stream, Stream::Gone))
                    else {
                        break 'session;
                    };
                    match Box::pin(tokio::time::timeout(Duration::from_secs(30), acceptor.accept(tcp))).await {
                        Ok(Ok(tls)) => {
                            let info = tls_info(tls.get_ref().1);
                            log.event(
                                "starttls",
                                &[("session", &id), ("version", &info.version), ("cipher", &info.cipher)],
                            );
                            stream = Stream::Tls(Box::new(tls));
                            if let Some(s) = sasl.as_mut() {
                                s.reset();
                            }
                            conn.tls_established(info, Time(now_ms()));
                        }
                        Ok(Err(e)) => {
                            log.event(
                                "tls-failed",
                                &[("session", &id), ("client", &remote.ip().to_string()), ("error", &e.to_string())],
                            );
                            break 'session;
                        }
                        Err(_) => {
                            log.event("tls-failed", &[("session", &id), ("error", "handshake timed out")]);
                            break 'session;
                        }
                    }
                }
                Need::Seal(seal) => {
                    // Authentication-Results for what the policy checked (mail-auth's own
                    // record of the checks, with their details), then our DKIM signature
                    // when Conn says the sender is one of our users; Conn adds them.
                    let mut fields = Vec::new();
                    let f = conn.facts();
                    if !seal.checked.is_empty() && auth_sender.as_deref() == f.sender.as_deref() {
                        let helo = f.helo.as_ref().map(|h| h.0.clone()).unwrap_or_default();
                        if let Some(h) = lookups.sender_auth.header(&auth_state, f.client_ip, &helo, &seal.sender) {
                            fields.push(h);
                        }
                    }
                    if seal.sign {
                        if let (Some(signer), Some((head, tail))) =
                            (lookups.signer.as_ref().filter(|s| s.covers(&seal.sender)), conn.sealing_message())
                        {
                            // The signature covers the whole message (the part spilled to disk
                            // included) and the Authentication-Results field too.
                            let whole = if tail > 0 { Box::pin(spill.whole(head, &shared)).await } else { None };
                            let data = match (&whole, tail) {
                                (Some((_, w)), _) => Some(w.as_slice()),
                                (None, 0) => Some(head),
                                (None, _) => None,
                            };
                            let mut signed = fields.concat().into_bytes();
                            match data {
                                Some(d) => {
                                    signed.extend_from_slice(d);
                                    match signer.sign(&signed, &seal.sender) {
                                        Ok(h) => fields.push(h),
                                        Err(e) => log.event("dkim-sign-failed", &[("session", &id), ("error", &e)]),
                                    }
                                }
                                None => log.event(
                                    "dkim-sign-failed",
                                    &[("session", &id), ("error", "the spilled message could not be read")],
                                ),
                            }
                        }
                    }
                    // The DKIM-Signature goes on top, as a signer prepends it.
                    fields.reverse();
                    conn.sealed(&fields);
                }
                Need::Queue(_) if !shared.qmgr_up() => {
                    // Accept nothing that would go nowhere: the queue manager is down (its
                    // supervisor is restarting it).
                    log.event("store-refused", &[("session", &id), ("reason", "queue manager down")]);
                    let r = RenderedReply {
                        code: 451,
                        enhanced: (4, 3, 0),
                        text: "Queue manager unavailable, try again later".into(),
                    };
                    conn.queue_failed(Some(r), Time(now_ms()));
                }
                Need::Queue(msg) => {
                    super::fault::check("session", &msg.data);
                    auth_state = AuthState::default();
                    auth_sender = None;
                    // The message moves to the blocking pool and back: no copy of its data.
                    let store = shared.store.clone();
                    let tail = if msg.tail > 0 { spill.file_for_store() } else { Ok(None) };
                    let reserved = conn.next_queue_id().map(str::to_string);
                    let joined = tokio::task::spawn_blocking(move || {
                        let r = match tail {
                            Ok(t) => store.store_as(reserved.as_deref(), &msg, t.as_deref()),
                            Err(e) => Err(e),
                        };
                        (r, msg)
                    })
                    .await;
                    spill.discard();
                    let now = Time(now_ms());
                    let (stored, msg) = match joined {
                        Ok((r, m)) => (Ok(r), m),
                        Err(e) => (Err(e), Default::default()),
                    };
                    match stored {
                        Ok(Ok(qid)) => {
                            let rcpts: Vec<&str> = msg.recipients.iter().map(|r| r.address.as_str()).collect();
                            log.event(
                                "queued",
                                &[
                                    ("session", &id),
                                    ("id", &qid),
                                    ("from", &msg.sender),
                                    ("to", &rcpts.join(",")),
                                    ("size", &msg.data.len().to_string()),
                                    ("hold", msg.hold.as_deref().unwrap_or("")),
                                ],
                            );
                            // Postfix's lines for a message queued: smtpd's (or pickup's) and qmgr's.
                            let sev = crate::log::Severity::Info;
                            match &local_user {
                                Some(user) => log.summary(
                                    "pickup",
                                    sev,
                                    &qid,
                                    &format!("uid={} from=<{}>", uid_of(user), msg.sender),
                                ),
                                None => log.summary("smtpd", sev, &qid, &format!("client={client_label}")),
                            }
                            log.summary(
                                "qmgr",
                                sev,
                                &qid,
                                &format!(
                                    "from=<{}>, size={}, nrcpt={} (queue active)",
                                    msg.sender,
                                    msg.data.len() as u64 + msg.tail,
                                    msg.recipients.len()
                                ),
                            );
                            conn.queued(&qid, now);
                            reserve(&mut conn);
                            shared.enqueued(&qid);
                        }
                        Ok(Err(StoreFailure::Full)) => {
                            log.event("store-failed", &[("session", &id), ("error", "no space left")]);
                            conn.queue_failed(None, now);
                        }
                        Ok(Err(StoreFailure::Io(e))) => {
                            log.event("store-failed", &[("session", &id), ("error", &e)]);
                            let r = RenderedReply {
                                code: 451,
                                enhanced: (4, 3, 0),
                                text: "Local error in processing, try again later".into(),
                            };
                            conn.queue_failed(Some(r), now);
                        }
                        Err(e) => {
                            log.event("store-failed", &[("session", &id), ("error", &e.to_string())]);
                            let r = RenderedReply {
                                code: 451,
                                enhanced: (4, 3, 0),
                                text: "Local error in processing, try again later".into(),
                            };
                            conn.queue_failed(Some(r), now);
                        }
                    }
                }
                Need::ProxyFilter(call) => {
                    let whole = match call.message.tail {
                        1.. => Box::pin(spill.whole(&call.message.data, &shared)).await.map(|(_, w)| w),
                        0 => None,
                    };
                    let timeout = prog.listener_or_default(Some(&lst.name)).proxy_filter_timeout;
                    let host = &lst.engine.hostname;
                    let outcome = crate::before_queue::filter(&shared, host, timeout, &id, &call, whole).await;
                    spill.discard();
                    conn.proxied(&outcome, Time(now_ms()));
                }
                Need::Milter(call) => {
                    let whole = match (call.spilled, conn.current_message()) {
                        (1.., Some(m)) => Box::pin(spill.whole(m, &shared)).await,
                        _ => None,
                    };
                    let answers = Box::pin(milters.call(&conn, &call, whole.as_ref().map(|(_, w)| w.as_slice()))).await;
                    conn.milter_replied(answers, Time(now_ms()));
                }
                Need::Note(n) => {
                    if let Note::Verdict { stage, outcome, .. } = &n {
                        refusal_line(&shared, stage.name(), outcome, &client_label, conn.facts());
                    }
                    Box::pin(note(&shared, &lookups, &prog, &id, n)).await
                }
            }
        }
        // A message that was decided (stored or refused) needs its spill no more.
        if spill.file.is_some() && !conn.session().message_open() {
            spill.discard();
        }
        // 2. Write what the engine produced.
        let mut wrote = false;
        while let Some(b) = conn.poll_transmit() {
            wrote = true;
            crate::metrics::get().replies_in(&lst.name, &b, &mut reply_line_start);
            if stream.write_all(&b).await.is_err() {
                break 'session;
            }
        }
        if wrote && stream.flush().await.is_err() {
            break;
        }
        if conn.is_closed() {
            break;
        }
        // 3. Wait for input, a timer, or shutdown.
        let engine_deadline = conn.poll_timeout().map(|t| {
            let now = now_ms();
            tokio::time::Instant::now() + Duration::from_millis(t.0.saturating_sub(now))
        });
        // The idle time-out of the phase the client is in (R46): DATA gets its own. Under
        // pressure (most slots taken) every time-out shrinks to STRESS_TIMEOUT.
        let stress = shared.under_pressure();
        let eff = |t: Duration| if stress { t.min(super::STRESS_TIMEOUT) } else { t };
        let in_message = conn.session().in_message();
        let idle_deadline = last_input + eff(if in_message { lst.data_timeout } else { lst.command_timeout });
        // Deadlines for a whole request, however the client paces its bytes (Postfix
        // smtpd_per_request_deadline): a command line within command_timeout of its first
        // byte; the whole DATA/BDAT phase within data_timeout plus one second per 500
        // bytes received (smtpd_min_data_rate).
        if in_message {
            line_started = None;
            data_started.get_or_insert((tokio::time::Instant::now(), data_bytes));
        } else {
            data_started = None;
            if conn.session().partial_input() {
                line_started.get_or_insert(tokio::time::Instant::now());
            } else {
                line_started = None;
            }
        }
        let request_deadline = match (line_started, data_started) {
            (Some(t), _) => Some(t + eff(lst.command_timeout)),
            (None, Some((t, bytes0))) => Some(
                t + eff(lst.data_timeout) + Duration::from_millis(data_bytes.saturating_sub(bytes0).saturating_mul(2)),
            ),
            _ => None,
        };
        let limit = request_deadline.map_or(idle_deadline, |r| r.min(idle_deadline));
        let deadline = engine_deadline.map_or(limit, |d| d.min(limit));
        let want = if data_started.is_some() { LARGE_READ } else { SMALL_READ };
        if buf.len() != want {
            buf = vec![0u8; want];
        }
        let room = conn.input_room().clamp(1, buf.len());
        tokio::select! {
            r = stream.read(&mut buf[..room]) => match r {
                Ok(0) | Err(_) => {
                    conn.handle_eof(Time(now_ms()));
                    let _ = conn.poll_need(Time(now_ms()));
                    break;
                }
                Ok(n) => {
                    last_input = tokio::time::Instant::now();
                    data_bytes += n as u64;
                    conn.set_free_space(shared.spool_free());
                    conn.handle_input(&buf[..n], Time(now_ms()));
                    if let Some((seq, bytes)) = conn.take_spill() {
                        spill.write(seq, &bytes, &shared, &id);
                    }
                }
            },
            _ = tokio::time::sleep_until(deadline) => {
                let now_i = tokio::time::Instant::now();
                if now_i >= limit {
                    let why = if now_i >= idle_deadline { "idle" } else { "request deadline" };
                    log.event(
                        "timeout",
                        &[("session", &id), ("client", &remote.ip().to_string()), ("kind", why), ("stress", if stress { "yes" } else { "" })],
                    );
                    conn.shutdown(Some(Reply::new(421, (4, 4, 2), "Timeout exceeded, closing connection")), Time(now_ms()));
                } else {
                    conn.handle_timeout(Time(now_ms()));
                }
            },
            _ = shutdown.changed(), if !closing_for_shutdown => {
                closing_for_shutdown = true;
                conn.shutdown(Some(Reply::new(421, (4, 3, 2), "Server shutting down, try again later")), Time(now_ms()));
            },
        }
    }
    milters.quit().await;
    stream.shutdown().await;
    spill.discard();
    log.event("disconnect", &[("session", &id), ("client", &remote.ip().to_string())]);
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

/// One session's share of its client's `concurrent` count, released on drop. With a
/// shared store it is a lease in Redis, renewed every third of its life while the session
/// lives: a host that dies without releasing it stops counting when the lease runs out.
struct ConcurrencyGuard {
    lookups: Arc<Lookups>,
    keys: Vec<String>,
    lease: String,
    renewer: Option<tokio::task::JoinHandle<()>>,
}

impl ConcurrencyGuard {
    async fn open(lookups: Arc<Lookups>, keys: Vec<String>, session: &str) -> ConcurrencyGuard {
        let lease = session.to_string();
        lookups.state.open(&keys, &lease).await;
        let renewer = lookups.state.is_shared().then(|| {
            let (l, k, id) = (lookups.clone(), keys.clone(), lease.clone());
            tokio::spawn(async move {
                let every = Duration::from_millis((l.state.lease_ms() / 3).max(300));
                loop {
                    tokio::time::sleep(every).await;
                    l.state.renew(&k, &id).await;
                }
            })
        });
        ConcurrencyGuard { lookups, keys, lease, renewer }
    }
}

impl Drop for ConcurrencyGuard {
    fn drop(&mut self) {
        // A poisoned lock still holds the counts: release ours all the same.
        self.lookups.state.close_local(&self.keys);
        if let Some(r) = self.renewer.take() {
            r.abort();
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                let (l, k, id) =
                    (self.lookups.clone(), std::mem::take(&mut self.keys), std::mem::take(&mut self.lease));
                rt.spawn(async move { l.state.close_shared(&k, &id).await });
            }
        }
    }
}

async fn note(shared: &Shared, lookups: &Lookups, prog: &Program, id: &str, n: Note) {
    match n {
        Note::Verdict { stage, outcome, rule, .. } => {
            let rule = rule.map(|r| prog.describe_loc(r)).unwrap_or_else(|| "default".into());
            crate::metrics::get().verdict(stage.name(), crate::metrics::outcome_kind(&outcome), &rule);
            shared
                .log
                .event("verdict", &[("session", id), ("stage", stage.name()), ("outcome", &outcome), ("rule", &rule)]);
        }
        Note::Log(text) => shared.log.event("policy-log", &[("session", id), ("text", &text)]),
        Note::Alert { to, text, every_ms } => shared.alert(&to, &text, every_ms).await,
        // Recorded before the stage's own lookups are answered: a session counts itself
        // first, so hosts racing on one shared window never accept past its limit together.
        Note::Count { counter, keys } => lookups.state.record(counter.name(), &keys, now_ms()).await,
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
