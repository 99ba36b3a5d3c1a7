//! One SMTP session of the daemon: a socket (plain, STARTTLS-upgraded or implicit TLS)
//! driving a [`Conn`]. Every need of the connection is answered here: lookups from
//! [`Lookups`], SASL from [`SaslServer`], durable storage from the spool.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use mailpolicy_lang::ir::{OptValue, Program, Resource};
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
    Gone,
}

impl Stream {
    async fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf).await,
            Stream::Tls(s) => s.read(buf).await,
            Stream::Gone => Ok(0),
        }
    }
    async fn write_all(&mut self, b: &[u8]) -> std::io::Result<()> {
        match self {
            Stream::Plain(s) => s.write_all(b).await,
            Stream::Tls(s) => s.write_all(b).await,
            Stream::Gone => Ok(()),
        }
    }
    async fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush().await,
            Stream::Tls(s) => s.flush().await,
            Stream::Gone => Ok(()),
        }
    }
    async fn shutdown(&mut self) {
        let _ = match self {
            Stream::Plain(s) => s.shutdown().await,
            Stream::Tls(s) => s.shutdown().await,
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

pub async fn run(
    shared: Arc<Shared>,
    lst: Arc<ListenerRt>,
    tcp: TcpStream,
    remote: SocketAddr,
    local: SocketAddr,
    id: String,
) {
    let prog: Arc<Program> = shared.program();
    let lookups: Arc<Lookups> = shared.lookups();
    let log = shared.log;
    let _ = tcp.set_nodelay(true);
    let (client_name, client_ptr) = lookups.reverse(remote.ip()).await;
    log.event(
        "connect",
        &[("session", &id), ("listener", &lst.name), ("client", &remote.ip().to_string()), ("name", &client_name)],
    );

    let mut stream = Stream::Plain(tcp);
    let mut peer = PeerInfo { remote: Some(remote), local: Some(local), tls: None };
    if lst.implicit_tls {
        let Some(acceptor) = lst.tls.clone() else { return };
        let Stream::Plain(tcp) = std::mem::replace(&mut stream, Stream::Gone) else { return };
        match tokio::time::timeout(Duration::from_secs(30), acceptor.accept(tcp)).await {
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
    let client = ClientInfo { name: client_name, ptr: client_ptr, listener: lst.name.clone(), session_id: id.clone() };
    let mut conn = Conn::new(prog.clone(), lst.engine.clone(), peer, client, Time(now_ms()));
    conn.set_requirements(lst.require_tls, lst.require_auth);
    let credentials = lst
        .credentials
        .as_ref()
        .map(|t| Arc::new(TableCredentials { lookups: lookups.clone(), table: t.clone() }) as Arc<dyn CredentialStore>);
    let mut sasl = credentials.and_then(|c| SaslServer::new(c).ok());
    let ip_key = format!("client.ip={}", remote.ip());
    let session_keys = crate::eval::session_keys(remote.ip());
    if let Ok(mut r) = lookups.rates.lock() {
        session_keys.iter().for_each(|k| r.open(k));
    }
    let mut auth_state = AuthState::default();
    let mut auth_sender: Option<String> = None;
    let mut shutdown = shared.shutdown.clone();
    let mut buf = vec![0u8; 64 * 1024];
    let mut last_input = tokio::time::Instant::now();
    let mut closing_for_shutdown = false;
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
                                AuthCheck::Spf => {
                                    Answer::Value(Some(sa.spf(&mut auth_state, ip, &helo, &sender).await.to_string()))
                                }
                                _ => match conn.current_message() {
                                    Some(m) => {
                                        let (d, dm, p) = sa.content(&mut auth_state, ip, &helo, &sender, m).await;
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
                                (Some(sc), Some(data)) => super::scan::scan(sc, data, conn.facts()).await,
                                _ => Answer::Error("no message to scan".into()),
                            }
                        }
                        _ => lookups.answer(&prog, &req, now_ms()).await,
                    };
                    conn.answer(req, a);
                }
                Need::AuthStep { mechanism, data } => {
                    let now = Time(now_ms());
                    let throttled = lookups
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
                    match s.step(&mechanism, data.as_deref()) {
                        SaslStep::Continue(ch) => conn.auth_continue(&ch, now),
                        SaslStep::Success(user) => {
                            log.event("auth", &[("session", &id), ("user", &user), ("mechanism", &mechanism)]);
                            conn.auth_done(AuthOutcome::Success { user }, now);
                        }
                        SaslStep::Failure => {
                            s.reset();
                            if let Ok(mut r) = lookups.rates.lock() {
                                r.record("auth_failures", &ip_key, now.0);
                            }
                            log.event(
                                "auth-failed",
                                &[("session", &id), ("client", &remote.ip().to_string()), ("mechanism", &mechanism)],
                            );
                            conn.auth_done(AuthOutcome::Failure { reply: None }, now);
                        }
                    }
                }
                Need::StartTls => {
                    // Flush the 220 first, then hand the socket to TLS.
                    while let Some(b) = conn.poll_transmit() {
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
                    match tokio::time::timeout(Duration::from_secs(30), acceptor.accept(tcp)).await {
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
                        if let (Some(signer), Some(data)) =
                            (lookups.signer.as_ref().filter(|s| s.covers(&seal.sender)), conn.sealing_message())
                        {
                            // The signature covers the Authentication-Results field too.
                            let mut signed = fields.concat().into_bytes();
                            signed.extend_from_slice(data);
                            match signer.sign(&signed, &seal.sender) {
                                Ok(h) => fields.push(h),
                                Err(e) => log.event("dkim-sign-failed", &[("session", &id), ("error", &e)]),
                            }
                        }
                    }
                    // The DKIM-Signature goes on top, as a signer prepends it.
                    fields.reverse();
                    conn.sealed(&fields);
                }
                Need::Queue(msg) => {
                    auth_state = AuthState::default();
                    auth_sender = None;
                    // The message moves to the blocking pool and back: no copy of its data.
                    let store = shared.store.clone();
                    let joined = tokio::task::spawn_blocking(move || {
                        let r = store.store(&msg);
                        (r, msg)
                    })
                    .await;
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
                            conn.queued(&qid, now);
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
                Need::Note(n) => note(&shared, &lookups, &prog, &id, n),
            }
        }
        // 2. Write what the engine produced.
        let mut wrote = false;
        while let Some(b) = conn.poll_transmit() {
            wrote = true;
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
        // The idle time-out of the phase the client is in (R46): DATA gets its own.
        let idle_deadline =
            last_input + if conn.session().in_message() { lst.data_timeout } else { lst.command_timeout };
        let deadline = engine_deadline.map_or(idle_deadline, |d| d.min(idle_deadline));
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
                    conn.handle_input(&buf[..n], Time(now_ms()));
                }
            },
            _ = tokio::time::sleep_until(deadline) => {
                if tokio::time::Instant::now() >= idle_deadline {
                    log.event("timeout", &[("session", &id), ("client", &remote.ip().to_string())]);
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
    stream.shutdown().await;
    if let Ok(mut r) = lookups.rates.lock() {
        session_keys.iter().for_each(|k| r.close(k));
    }
    log.event("disconnect", &[("session", &id), ("client", &remote.ip().to_string())]);
}

fn note(shared: &Shared, lookups: &Lookups, prog: &Program, id: &str, n: Note) {
    match n {
        Note::Verdict { stage, outcome, rule, .. } => {
            let rule = rule.map(|r| prog.describe_loc(r)).unwrap_or_else(|| "default".into());
            shared
                .log
                .event("verdict", &[("session", id), ("stage", stage.name()), ("outcome", &outcome), ("rule", &rule)]);
        }
        Note::Log(text) => shared.log.event("policy-log", &[("session", id), ("text", &text)]),
        Note::Alert { to, text, every_ms } => shared.alert(&to, &text, every_ms),
        Note::Count { counter, keys } => {
            if let Ok(mut r) = lookups.rates.lock() {
                let now = now_ms();
                for k in keys {
                    r.record(counter.name(), &k, now);
                }
            }
        }
    }
}

/// Idle timeout of a listener.
pub fn command_timeout(prog: &Program, listener: Option<&str>) -> Duration {
    let l = listener.and_then(|n| prog.listener(n));
    match l.and_then(|l| l.option("command_timeout")) {
        Some(OptValue::Duration(ms)) => Duration::from_millis(*ms),
        _ => Duration::from_secs(300),
    }
}

/// Idle time-out inside DATA/BDAT of a listener (`data_timeout`, default 10 minutes).
pub fn data_timeout(prog: &Program, listener: Option<&str>) -> Duration {
    let l = listener.and_then(|n| prog.listener(n));
    match l.and_then(|l| l.option("data_timeout")) {
        Some(OptValue::Duration(ms)) => Duration::from_millis(*ms),
        _ => Duration::from_secs(600),
    }
}
