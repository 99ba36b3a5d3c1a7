//! No accepted mail lost with a host (R12; spec/language.md section 5.5): shadow copies.
//!
//! With `backup_peer`, a session that stored a message hands the peer a copy of its spool
//! file before it answers 250 ([`Backup::shadow`]); the peer holds it in
//! `SPOOL/backup/held/ORIGIN/ID` ([`serve`]). This host then says it is alive (a heartbeat
//! key in the shared state store, renewed every second) and, once a message has left its
//! spool (every recipient final, or deleted by the administrator), confirms it (a key per
//! message). The peer drops a copy when its origin confirmed it, and releases it into its
//! own queue, under the same queue id, only when the origin's heartbeat has been absent for
//! `backup_takeover` ([`hold`]). An unknown answer (the store is away) never releases.
//!
//! The copy travels on the peer's `backup_listen` socket, one connection per message:
//!
//! ```text
//! MAILPOLICY-SHADOW 1 ORIGIN ID LENGTH\r\n     ORIGIN = HOSTNAME@SPOOLID
//! LENGTH bytes: the spool's message file
//! HMAC\r\n                                     hex HMAC-SHA256 over the line and the bytes
//! <- 250 2.0.0 held ... | 4xx/5xx reason
//! ```
//!
//! The HMAC key is the `backup_key` secret: nothing without it puts a message into a
//! peer's queue. The spool id (`SPOOL/backup/id`, made once) tells a restarted host from a
//! host whose spool was lost: a new spool is a new origin, so the old one's copies are
//! released.
//!
//! A message of this host's queue with no `sent/ID` marker has no copy held (its copy
//! failed under `backup_on_error accept`, it is a DSN or alert stored just before a crash,
//! or a copy released here from a peer): [`recopy`] hands the peer one at start and after
//! every failed copy, with a backoff, until it is held or the message left the queue. A
//! copy of an id the peer already holds replaces the held file (a rename): one copy, one
//! delivery at most.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::spool::{QueueId, QueueName, Spool};
use crate::{now_ms, Shared};

const MAGIC: &str = "MAILPOLICY-SHADOW";
/// How often heartbeats are renewed, confirmations sent and held copies checked.
const TICK: Duration = Duration::from_secs(1);
/// Life of a heartbeat key (renewed every [`TICK`]).
pub const HEARTBEAT_MS: u64 = 5_000;
/// Life of a confirmation in the store; the peer deletes it as soon as it acted on it.
const CONFIRM_MS: u64 = 7 * 86_400_000;
/// Every this many ticks the sent-copy markers are checked against the spool, for
/// messages that left it without the queue manager (`mailc queue delete` with no daemon).
const RECONCILE_TICKS: u64 = 60;
/// The header line's bound.
const MAX_LINE: u64 = 600;
/// Confirmations and status checks per pipeline.
const BATCH: usize = 500;
/// The queues whose messages have a copy held (all but `corrupt/`).
const QUEUES: [QueueName; 4] = [QueueName::Incoming, QueueName::Hold, QueueName::Active, QueueName::Deferred];
/// A message stored this recently is its storer's to copy ([`recopy`] leaves it alone).
const GRACE: Duration = Duration::from_secs(2);
/// Copies [`recopy`] has in flight at once.
const RECOPY_AT_ONCE: usize = 4;
/// A message whose copy failed is tried again after this, doubled at each failure up to
/// [`RECOPY_MAX_WAIT`].
const RECOPY_FIRST_WAIT: Duration = Duration::from_secs(5);
const RECOPY_MAX_WAIT: Duration = Duration::from_secs(600);
/// After a pass in which nothing was copied and something failed (the peer away), the
/// next pass waits this long, doubled up to [`RECOPY_MAX_PAUSE`].
const RECOPY_FIRST_PAUSE: Duration = Duration::from_secs(2);
const RECOPY_MAX_PAUSE: Duration = Duration::from_secs(60);
/// With nothing to retry, the queue is looked over again this often (a message whose
/// marker went away some other way).
const RECOPY_RESCAN: Duration = Duration::from_secs(60);
/// What an origin says of a message whose copy is held: done (the copy goes), or lost
/// here (quarantined in `corrupt/`: the copy is delivered now).
const DONE: &str = "1";
const LOST: &str = "lost";

type HmacSha256 = Hmac<Sha256>;

/// A host's side of shadow copies (one per daemon; settings read at start).
pub struct Backup {
    /// This host among its peers: `HOSTNAME@SPOOLID`.
    pub origin: String,
    key: Vec<u8>,
    /// `backup_peer`: where this host's copies go.
    pub peer: Option<SocketAddr>,
    /// `backup_on_error tempfail`.
    pub tempfail: bool,
    timeout: Duration,
    takeover_ms: u64,
    /// A held copy older than this is dropped (its origin bounced it long ago).
    keep_ms: u64,
    /// The largest copy taken from a peer.
    max_len: u64,
    spool_dir: PathBuf,
    /// `backup_tls`: the listener's side (copies only over TLS) and the sender's (the
    /// peer verified against `backup_tls_ca`, for `backup_tls_name`).
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    connector: Option<(tokio_rustls::TlsConnector, rustls::pki_types::ServerName<'static>)>,
    /// Queue ids that left this host's spool (from the queue manager).
    removed: mpsc::UnboundedSender<String>,
    removed_rx: Mutex<Option<mpsc::UnboundedReceiver<String>>>,
    /// Queue ids whose copy is being sent (or decided on by a session), with how many
    /// hold them: [`recopy`] leaves them alone.
    claims: Mutex<HashMap<String, usize>>,
    /// A copy failed: [`recopy`] looks again soon.
    failed: tokio::sync::Notify,
}

/// A queue id held by [`Backup::claim`] until dropped.
pub struct Claim<'a> {
    b: &'a Backup,
    id: String,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        let mut claims = self.b.claims.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = claims.get_mut(&self.id) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                claims.remove(&self.id);
            }
        }
    }
}

type TlsSides =
    (Option<tokio_rustls::TlsAcceptor>, Option<(tokio_rustls::TlsConnector, rustls::pki_types::ServerName<'static>)>);

/// `backup_tls`: the listener's certificate (`backup_tls_cert`/`backup_tls_key`, else the
/// self-signed pair under `SPOOL/tls/`), and the sender's trust (`backup_tls_ca`) and name
/// (`backup_tls_name`, else the peer's IP address).
fn tls_sides(
    srv: &mailpolicy_lang::settings::Server,
    policy_dir: &Path,
    spool_dir: &Path,
    hostname: &str,
    peer: Option<SocketAddr>,
) -> Result<TlsSides, String> {
    let acceptor = match &srv.backup_listen {
        Some(_) => {
            let (cert, key) = match (&srv.backup_tls_cert, &srv.backup_tls_key) {
                (Some(c), Some(k)) => (policy_dir.join(c), policy_dir.join(k)),
                _ => crate::tls::self_signed(&spool_dir.join("tls"), hostname)?,
            };
            let cfg = crate::tls::server_config(&cert, &key, None, false).map_err(|e| format!("backup_tls: {e}"))?;
            Some(tokio_rustls::TlsAcceptor::from(cfg))
        }
        None => None,
    };
    let connector = match peer {
        Some(p) => {
            let ca = srv.backup_tls_ca.as_ref().ok_or("backup_tls: `backup_tls_ca` is needed to verify the peer")?;
            let cfg = crate::tls::client_config(&policy_dir.join(ca)).map_err(|e| format!("backup_tls_ca: {e}"))?;
            let name = srv.backup_tls_name.clone().unwrap_or_else(|| p.ip().to_string());
            let name = rustls::pki_types::ServerName::try_from(name.clone())
                .map_err(|_| format!("backup_tls_name: \"{name}\" is not a DNS name or an IP address"))?;
            Some((tokio_rustls::TlsConnector::from(cfg), name))
        }
        None => None,
    };
    Ok((acceptor, connector))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok())).collect()
}

/// `HOSTNAME@SPOOLID`: a host name's characters, `@`, 16 hex digits. It names a directory.
fn valid_origin(o: &str) -> bool {
    let Some((host, spool)) = o.split_once('@') else { return false };
    !host.is_empty()
        && host.len() <= 253
        && !host.starts_with('.')
        && host.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
        && spool.len() == 16
        && spool.bytes().all(|b| b.is_ascii_hexdigit())
}

impl Backup {
    /// The host's backup side as its policy sets it up (None without `backup_peer` and
    /// `backup_listen`). Makes `SPOOL/backup/` and the spool id: called once privileges
    /// are dropped, so the files are the daemon user's.
    pub fn new(
        prog: &mailpolicy_lang::ir::Program,
        policy_dir: &Path,
        spool_dir: &Path,
        key: Option<&str>,
        hostname: &str,
    ) -> Result<Option<Backup>, String> {
        let srv = &prog.server;
        if srv.backup_peer.is_none() && srv.backup_listen.is_none() {
            return Ok(None);
        }
        let key = key.filter(|k| !k.is_empty()).ok_or("backup_key: the secret has no value")?;
        let peer = match &srv.backup_peer {
            Some(p) => Some(p.parse::<SocketAddr>().map_err(|_| format!("backup_peer: \"{p}\" is not an IP:port"))?),
            None => None,
        };
        let dir = spool_dir.join("backup");
        for d in ["held", "sent", "tmp"] {
            std::fs::create_dir_all(dir.join(d)).map_err(|e| format!("{}: {e}", dir.join(d).display()))?;
        }
        // Copies half-received when this host last stopped are garbage (their sender got
        // no 250 for them).
        for e in std::fs::read_dir(dir.join("tmp")).into_iter().flatten().flatten() {
            let _ = std::fs::remove_file(e.path());
        }
        let idf = dir.join("id");
        let spool_id = match std::fs::read_to_string(&idf) {
            Ok(s) if s.trim().len() == 16 && s.trim().bytes().all(|b| b.is_ascii_hexdigit()) => s.trim().to_string(),
            _ => {
                let id = format!("{:016x}", rand::random::<u64>());
                let tmp = dir.join("tmp").join("id");
                let write = || -> std::io::Result<()> {
                    std::fs::write(&tmp, format!("{id}\n"))?;
                    std::fs::File::open(&tmp)?.sync_all()?;
                    std::fs::rename(&tmp, &idf)?;
                    std::fs::File::open(&dir)?.sync_all()
                };
                write().map_err(|e| format!("{}: {e}", idf.display()))?;
                id
            }
        };
        let origin = format!("{}@{spool_id}", hostname.to_ascii_lowercase());
        if !valid_origin(&origin) {
            return Err(format!("backup: the hostname \"{hostname}\" cannot name this host to its peers"));
        }
        let (acceptor, connector) =
            if srv.backup_tls { tls_sides(srv, policy_dir, spool_dir, hostname, peer)? } else { (None, None) };
        let (tx, rx) = mpsc::unbounded_channel();
        Ok(Some(Backup {
            acceptor,
            connector,
            origin,
            key: key.as_bytes().to_vec(),
            peer,
            tempfail: srv.backup_on_error == mailpolicy_lang::settings::BackupOnError::Tempfail,
            timeout: srv.backup_timeout.max(Duration::from_millis(100)),
            takeover_ms: srv.backup_takeover.as_millis() as u64,
            keep_ms: srv.queue_lifetime.max(srv.bounce_lifetime).as_millis() as u64
                + srv.backup_takeover.as_millis() as u64
                + 86_400_000,
            max_len: srv.max_message_size.saturating_mul(2).saturating_add(16 << 20),
            spool_dir: spool_dir.to_path_buf(),
            removed: tx,
            removed_rx: Mutex::new(Some(rx)),
            claims: Mutex::new(HashMap::new()),
            failed: tokio::sync::Notify::new(),
        }))
    }

    fn dir(&self, sub: &str) -> PathBuf {
        self.spool_dir.join("backup").join(sub)
    }

    fn mac(&self) -> HmacSha256 {
        // HMAC takes a key of any length.
        HmacSha256::new_from_slice(&self.key).unwrap_or_else(|_| HmacSha256::new_from_slice(b"-").expect("hmac"))
    }

    /// The queue manager removed `id` from the spool, or moved it to `corrupt/`: confirm
    /// it, or say its copy is to be delivered, if a copy of it is held.
    pub fn removed(&self, id: &str) {
        let _ = self.removed.send(id.to_string());
    }

    /// This host's message `id` is in `corrupt/` (quarantined: never delivered from here).
    fn unusable(&self, id: &str) -> bool {
        QueueId::parse(id).is_some() && self.spool_dir.join(QueueName::Corrupt.as_str()).join(id).is_file()
    }

    /// `id` is being copied, or its copy decided on, until the claim is dropped: the
    /// retries of [`recopy`] leave it alone meanwhile.
    pub fn claim(&self, id: &str) -> Claim<'_> {
        *self.claims.lock().unwrap_or_else(|p| p.into_inner()).entry(id.to_string()).or_insert(0) += 1;
        Claim { b: self, id: id.to_string() }
    }

    fn claimed(&self, id: &str) -> bool {
        self.claims.lock().unwrap_or_else(|p| p.into_inner()).contains_key(id)
    }

    /// A copy of a message that stays in the queue failed: it is tried again later
    /// ([`recopy`]).
    pub fn retry_later(&self) {
        self.failed.notify_one();
    }

    /// The file of this host's message `id` in a queue whose messages have copies.
    fn queued(&self, id: &str) -> Option<PathBuf> {
        QueueId::parse(id)?;
        QUEUES.iter().map(|q| self.spool_dir.join(q.as_str()).join(id)).find(|p| p.is_file())
    }

    /// Hand the peer a copy of the stored message `id` (before the client's 250). Ok once
    /// the peer said it holds it, durably; Err with the reason otherwise.
    pub async fn shadow(&self, id: &str) -> Result<(), String> {
        let Some(peer) = self.peer else { return Ok(()) };
        let _claim = self.claim(id);
        let path = self.queued(id).ok_or_else(|| format!("{id} is not in the spool"))?;
        let exchange = async {
            let tcp = TcpStream::connect(peer).await.map_err(|e| format!("connect: {e}"))?;
            match &self.connector {
                Some((c, name)) => {
                    let tls = c.connect(name.clone(), tcp).await.map_err(|e| format!("TLS: {e}"))?;
                    self.send_copy(tls, id, &path).await
                }
                None => self.send_copy(tcp, id, &path).await,
            }
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(Ok(())) => {
                // The marker says a copy is held (and what to confirm). Not fsynced: a
                // marker lost in a crash leaves the copy held until it expires, never lost.
                let _ = std::fs::write(self.dir("sent").join(id), format!("{peer}\n"));
                // A message that left the queue while its copy travelled (a retry's) was
                // told to `announce` before its marker existed: told again, so it is
                // confirmed.
                // (Looked for twice: a message moving between queues cannot be missed by
                // both looks unless it moves twice meanwhile.)
                if self.queued(id).is_none() && self.queued(id).is_none() {
                    self.removed(id);
                }
                Ok(())
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(format!("no answer within {} ms", self.timeout.as_millis())),
        }
    }

    /// One copy on a connection to the peer (TLS or not): the header line, the file, the
    /// HMAC; Ok once the peer answered 250.
    async fn send_copy<S>(&self, mut s: S, id: &str, path: &Path) -> Result<(), String>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let mut file = tokio::fs::File::open(path).await.map_err(|e| e.to_string())?;
        let len = file.metadata().await.map_err(|e| e.to_string())?.len();
        let line = format!("{MAGIC} 1 {} {id} {len}\r\n", self.origin);
        let mut mac = self.mac();
        mac.update(line.as_bytes());
        s.write_all(line.as_bytes()).await.map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; 64 << 10];
        let mut sent = 0u64;
        while sent < len {
            let n = file.read(&mut buf).await.map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("the message file is short".to_string());
            }
            let chunk = buf.get(..n).unwrap_or_default();
            mac.update(chunk);
            s.write_all(chunk).await.map_err(|e| e.to_string())?;
            sent += n as u64;
        }
        s.write_all(format!("{}\r\n", hex(&mac.finalize().into_bytes())).as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut reply = String::new();
        BufReader::new(&mut s).take(MAX_LINE).read_line(&mut reply).await.map_err(|e| e.to_string())?;
        let reply = reply.trim_end().to_string();
        if reply.starts_with("250") {
            let _ = s.shutdown().await;
            Ok(())
        } else if reply.is_empty() {
            Err("the peer closed the connection".to_string())
        } else {
            Err(format!("the peer answered: {reply}"))
        }
    }

    /// A message this host made itself (`kind`: a DSN, an alert), stored: a copy of it is
    /// held by the peer like any accepted message's (the same path and confirmation), then
    /// it goes to the queue. No client waits on it: a copy that fails is logged, the
    /// message queued alone, whatever `backup_on_error` says, and the copy retried
    /// ([`recopy`]).
    pub async fn shadow_own(&self, log: crate::log::Logger, id: &str, kind: &str) {
        let Some(peer) = self.peer.map(|p| p.to_string()) else { return };
        match self.shadow(id).await {
            Ok(()) => log.event("shadowed", &[("id", id), ("kind", kind), ("peer", &peer)]),
            Err(e) => {
                log.event(
                    "shadow-failed",
                    &[("id", id), ("kind", kind), ("peer", &peer), ("error", &e), ("action", "kept without a copy")],
                );
                self.retry_later();
            }
        }
    }

    /// This host's messages with no copy held: the ids in [`QUEUES`] with no `sent/`
    /// marker, stored over [`GRACE`] ago, in arrival order; and whether one was left out
    /// for being that recent.
    fn unshadowed(&self) -> (Vec<String>, bool) {
        let sent: std::collections::HashSet<String> = std::fs::read_dir(self.dir("sent"))
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .collect();
        let now = std::time::SystemTime::now();
        let (mut out, mut recent) = (Vec::new(), false);
        for q in QUEUES {
            for e in std::fs::read_dir(self.spool_dir.join(q.as_str())).into_iter().flatten().flatten() {
                let Ok(name) = e.file_name().into_string() else { continue };
                if QueueId::parse(&name).is_none() || sent.contains(&name) {
                    continue;
                }
                // (A time in the future, the clock set back, counts as old.)
                let Ok(modified) = e.metadata().and_then(|m| m.modified()) else { continue };
                if now.duration_since(modified).is_ok_and(|age| age < GRACE) {
                    recent = true;
                    continue;
                }
                out.push(name);
            }
        }
        out.sort();
        out.dedup();
        (out, recent)
    }

    /// Remove the stored message `id` (refused for want of a copy).
    pub async fn discard(&self, id: &str) {
        let (dir, id) = (self.spool_dir.clone(), id.to_string());
        let _ = tokio::task::spawn_blocking(move || {
            let qid = QueueId::parse(&id)?;
            Spool::attach(&dir).ok()?.remove(&qid).ok()
        })
        .await;
    }

    /// Start the background work: heartbeats and confirmations with a peer; the backup
    /// listener and the holding of peers' copies with `listen`. With a peer, the answer
    /// comes once the first heartbeat was written (or failed, within `state_timeout`): the
    /// daemon accepts mail after it, so no copy of this host's reaches the peer before
    /// the store could say this host is alive.
    pub fn spawn(
        self: &Arc<Self>,
        shared: Arc<Shared>,
        listen: Option<TcpListener>,
    ) -> Option<tokio::sync::oneshot::Receiver<()>> {
        let mut first = None;
        if self.peer.is_some() {
            let rx = self.removed_rx.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(rx) = rx {
                let (tx, beat) = tokio::sync::oneshot::channel();
                first = Some(beat);
                tokio::spawn(announce(self.clone(), shared.clone(), rx, tx));
            }
        }
        if let Some(sock) = listen {
            tokio::spawn(serve(self.clone(), shared.clone(), sock));
            tokio::spawn(hold(self.clone(), shared));
        }
        first
    }
}

/// The origin side: a heartbeat every tick (the first one said on `first`; a failure
/// logged once per spell); confirmations of the messages that left the spool and had a
/// copy held, batched per tick; a full check of the markers at start and every
/// [`RECONCILE_TICKS`].
async fn announce(
    b: Arc<Backup>,
    shared: Arc<Shared>,
    mut removed: mpsc::UnboundedReceiver<String>,
    first: tokio::sync::oneshot::Sender<()>,
) {
    let mut stop = shared.shutdown.clone();
    let mut pending: Vec<String> = Vec::new();
    let sent = b.dir("sent");
    let mut tick: u64 = 0;
    let mut first = Some(first);
    let mut failing = false;
    loop {
        let state = shared.lookups();
        match state.state.heartbeat(&b.origin, HEARTBEAT_MS).await {
            Ok(()) if failing => {
                failing = false;
                shared.log.event("backup-heartbeat", &[("origin", &b.origin), ("status", "restored")]);
            }
            Ok(()) => {}
            Err(e) => {
                if !failing {
                    shared.log.event("backup-heartbeat-failed", &[("origin", &b.origin), ("error", &e)]);
                }
                failing = true;
            }
        }
        if let Some(f) = first.take() {
            let _ = f.send(());
            // The retries start here too, not sooner: like a session's copy, none reaches
            // the peer before the store could say this host is alive (a peer that saw this
            // origin silent for long would release it at once).
            tokio::spawn(recopy(b.clone(), shared.clone()));
        }
        if tick % RECONCILE_TICKS == 0 {
            // Markers whose message is in no queue: it left without the queue manager.
            let (dir, spool_dir) = (sent.clone(), b.spool_dir.clone());
            let gone = tokio::task::spawn_blocking(move || {
                let Ok(spool) = Spool::attach(&spool_dir) else { return Vec::new() };
                let Ok(rd) = std::fs::read_dir(&dir) else { return Vec::new() };
                // (One in `corrupt/` is unusable here: its peer is told.)
                rd.filter_map(|e| e.ok())
                    .filter_map(|e| e.file_name().into_string().ok())
                    .filter(|n| {
                        QueueId::parse(n)
                            .is_some_and(|id| !spool.holds(&id) || spool_dir.join("corrupt").join(n).is_file())
                    })
                    .collect::<Vec<_>>()
            })
            .await
            .unwrap_or_default();
            pending.extend(gone);
        }
        while let Ok(id) = removed.try_recv() {
            if sent.join(&id).is_file() {
                pending.push(id);
            }
        }
        pending.sort();
        pending.dedup();
        // A message quarantined in `corrupt/` will never be delivered from here: its peer
        // is told to deliver its copy now; every other one left the spool done.
        let (lost, done): (Vec<String>, Vec<String>) = pending.iter().cloned().partition(|id| b.unusable(id));
        for (ids, what, event) in [(lost, LOST, "shadow-unusable"), (done, DONE, "shadow-confirmed")] {
            for chunk in ids.chunks(BATCH) {
                if state.state.confirm(&b.origin, chunk, what, CONFIRM_MS).await.is_ok() {
                    for id in chunk {
                        let _ = std::fs::remove_file(sent.join(id));
                        shared.log.event(event, &[("id", id), ("origin", &b.origin)]);
                    }
                    pending.retain(|p| !chunk.contains(p));
                }
            }
        }
        tick += 1;
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            Some(id) = removed.recv() => {
                if sent.join(&id).is_file() {
                    pending.push(id);
                }
            }
            _ = stop.changed() => break,
        }
    }
}

/// The origin side's retries: a copy for every message of this host's queue that has
/// none held (no `sent/` marker), at start (once the first heartbeat was tried; recovery
/// is done by then), whenever a copy failed and every [`RECOPY_RESCAN`], in the background (listeners and queue manager never wait on it). At most
/// [`RECOPY_AT_ONCE`] copies at once and one per message; a message whose copy fails waits
/// [`RECOPY_FIRST_WAIT`], doubled at each failure up to [`RECOPY_MAX_WAIT`]; a pass stops
/// at its first failure (the peer is likely away) and, if it copied nothing, the next one
/// waits [`RECOPY_FIRST_PAUSE`], doubled up to [`RECOPY_MAX_PAUSE`]; a copy that lands
/// makes every waiting message due again. A message that left the queue is forgotten.
/// Log: `shadowed id=ID kind=retry peer=...`, or `shadow-failed id=ID kind=retry ...
/// action="retry in Ns"`.
async fn recopy(b: Arc<Backup>, shared: Arc<Shared>) {
    let Some(peer) = b.peer.map(|p| p.to_string()) else { return };
    let mut stop = shared.shutdown.clone();
    // id -> (failures in a row, when it is due again)
    let mut waiting: HashMap<String, (u32, tokio::time::Instant)> = HashMap::new();
    let mut pause = RECOPY_FIRST_PAUSE;
    let mut next = tokio::time::Instant::now();
    // The first pass looks again once the messages too recent for it are not.
    let mut first = true;
    // The last pass copied nothing and failed: the peer is away.
    let mut away = false;
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            _ = b.failed.notified() => {
                // The failed message is past [`GRACE`] by then. (With the peer away, the
                // pass already planned comes first.)
                if !away {
                    next = next.min(tokio::time::Instant::now() + GRACE + Duration::from_millis(100));
                }
                continue;
            }
            _ = stop.changed() => break,
        }
        let lister = b.clone();
        let (ids, recent) = tokio::task::spawn_blocking(move || lister.unshadowed()).await.unwrap_or_default();
        waiting.retain(|id, _| ids.binary_search(id).is_ok());
        let now = tokio::time::Instant::now();
        let due: Vec<String> = ids.into_iter().filter(|id| waiting.get(id).is_none_or(|(_, at)| *at <= now)).collect();
        let mut due = due.into_iter();
        let (mut copied, mut failed) = (0usize, 0usize);
        let mut running = tokio::task::JoinSet::new();
        loop {
            while failed == 0 && running.len() < RECOPY_AT_ONCE {
                let Some(id) = due.next() else { break };
                // Being copied by its session (or so recently copied that the listing
                // missed its marker): not this pass's.
                if b.claimed(&id) || b.dir("sent").join(&id).is_file() {
                    continue;
                }
                let b = b.clone();
                running.spawn(async move {
                    let r = b.shadow(&id).await;
                    (id, r)
                });
            }
            let Some(done) = running.join_next().await else { break };
            let Ok((id, res)) = done else {
                failed += 1;
                continue;
            };
            match res {
                Ok(()) => {
                    copied += 1;
                    waiting.remove(&id);
                    shared.log.event("shadowed", &[("id", &id), ("kind", "retry"), ("peer", &peer)]);
                }
                // Gone meanwhile (delivered, deleted): nothing to copy.
                Err(_) if b.queued(&id).is_none() => {
                    waiting.remove(&id);
                }
                Err(e) => {
                    failed += 1;
                    let n = waiting.get(&id).map_or(0, |w| w.0).saturating_add(1);
                    let wait = RECOPY_FIRST_WAIT.saturating_mul(1 << (n - 1).min(16)).min(RECOPY_MAX_WAIT);
                    waiting.insert(id.clone(), (n, tokio::time::Instant::now() + wait));
                    let action = format!("retry in {}s", wait.as_secs());
                    shared.log.event(
                        "shadow-failed",
                        &[("id", &id), ("kind", "retry"), ("peer", &peer), ("error", &e), ("action", &action)],
                    );
                }
            }
        }
        let now = tokio::time::Instant::now();
        if copied > 0 {
            // The peer takes copies again: whatever waited is tried at once.
            for w in waiting.values_mut() {
                w.1 = now;
            }
            pause = RECOPY_FIRST_PAUSE;
        }
        away = failed > 0 && copied == 0;
        next = if away {
            let p = pause;
            pause = pause.saturating_mul(2).min(RECOPY_MAX_PAUSE);
            now + p
        } else {
            let mut at = waiting.values().map(|w| w.1).min().unwrap_or(now + RECOPY_RESCAN).min(now + RECOPY_RESCAN);
            if recent && first {
                at = at.min(now + GRACE);
            }
            at.max(now + Duration::from_secs(1))
        };
        first = false;
    }
}

/// Copies received at once; a connection past them is answered 421 and closed.
const MAX_RECEIVING: usize = 64;

/// The backup listener: copies from peers, each checked and made durable before `250`.
async fn serve(b: Arc<Backup>, shared: Arc<Shared>, sock: TcpListener) {
    let mut stop = shared.shutdown.clone();
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_RECEIVING));
    loop {
        let (tcp, remote) = tokio::select! {
            a = sock.accept() => match a {
                Ok(x) => x,
                Err(e) => {
                    shared.log.event("accept-failed", &[("listener", "backup"), ("error", &e.to_string())]);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.changed() => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            shared.log.event("shadow-refused", &[("client", &remote.to_string()), ("reason", "too many connections")]);
            tokio::spawn(async move {
                let mut tcp = tcp;
                let _ = tcp.write_all(b"421 4.7.0 too many connections\r\n").await;
            });
            continue;
        };
        let (b, shared) = (b.clone(), shared.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let Some(acceptor) = b.acceptor.clone() else { return take_copy(&b, &shared, remote, tcp).await };
            // `backup_tls`: a copy comes only over TLS; a plain or failed handshake is
            // refused (nothing is answered in the clear).
            match tokio::time::timeout(b.timeout, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => take_copy(&b, &shared, remote, tls).await,
                Ok(Err(e)) => {
                    let why = format!("TLS handshake: {e}");
                    shared.log.event("shadow-refused", &[("client", &remote.to_string()), ("reason", &why)]);
                }
                Err(_) => {
                    shared.log.event("shadow-refused", &[("client", &remote.to_string()), ("reason", "TLS time-out")]);
                }
            }
        });
    }
}

/// One peer's connection: its copy held durably and answered 250, or refused.
async fn take_copy<S>(b: &Backup, shared: &Shared, remote: SocketAddr, mut tcp: S)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let res = match tokio::time::timeout(b.timeout, receive(b, &mut tcp)).await {
        Ok(r) => r,
        Err(_) => Err(("421 4.4.2 time-out".to_string(), "time-out".to_string(), None)),
    };
    match res {
        Ok((origin, id, size)) => {
            // Logged before the answer (the copy is durable by now): the line is there when
            // the origin's client gets its 250.
            shared.log.event(
                "shadow-held",
                &[("origin", &origin), ("id", &id), ("size", &size.to_string()), ("client", &remote.to_string())],
            );
            let _ = tcp.write_all(format!("250 2.0.0 held {origin} {id}\r\n").as_bytes()).await;
        }
        Err((reply, why, tmp)) => {
            if let Some(t) = tmp {
                let _ = std::fs::remove_file(t);
            }
            let _ = tcp.write_all(format!("{reply}\r\n").as_bytes()).await;
            shared.log.event("shadow-refused", &[("client", &remote.to_string()), ("reason", &why)]);
        }
    }
    let _ = tcp.shutdown().await;
}

type Refusal = (String, String, Option<PathBuf>);

/// One copy from a peer: (origin, queue id, size) once it is held durably.
async fn receive<S>(b: &Backup, tcp: &mut S) -> Result<(String, String, u64), Refusal>
where
    S: tokio::io::AsyncRead + Unpin,
{
    let refuse = |reply: &str, why: &str| (reply.to_string(), why.to_string(), None);
    let mut r = BufReader::new(tcp);
    let mut line = Vec::new();
    (&mut r)
        .take(MAX_LINE)
        .read_until(b'\n', &mut line)
        .await
        .map_err(|e| refuse("451 4.3.0 read error", &e.to_string()))?;
    let text = std::str::from_utf8(&line).map_err(|_| refuse("501 5.5.2 bad header", "header is not text"))?;
    let words: Vec<&str> = text.trim_end().split(' ').collect();
    let [magic, version, origin, id, len] = words.as_slice() else {
        return Err(refuse("501 5.5.2 bad header", "malformed header"));
    };
    if *magic != MAGIC || *version != "1" || !text.ends_with("\r\n") {
        return Err(refuse("501 5.5.2 bad header", "malformed header"));
    }
    let origin = origin.to_ascii_lowercase();
    if !valid_origin(&origin) {
        return Err(refuse("501 5.5.2 bad origin", "malformed origin"));
    }
    if origin == b.origin {
        return Err(refuse("550 5.7.0 a host is not its own backup", "a copy from this host itself"));
    }
    let Some(qid) = QueueId::parse(id) else { return Err(refuse("501 5.5.2 bad queue id", "malformed queue id")) };
    let len: u64 = len.parse().map_err(|_| refuse("501 5.5.2 bad length", "malformed length"))?;
    if len > b.max_len {
        return Err(refuse("552 5.3.4 copy too large", "copy too large"));
    }
    let mut mac = b.mac();
    mac.update(&line);
    let tmp = b.dir("tmp").join(format!("{origin}.{}.{:08x}", qid.as_str(), rand::random::<u32>()));
    let io_err = |e: std::io::Error| ("451 4.3.0 cannot hold the copy".to_string(), e.to_string(), None::<PathBuf>);
    let mut f = tokio::fs::OpenOptions::new().write(true).create_new(true).open(&tmp).await.map_err(io_err)?;
    let with_tmp = |(reply, why, _): Refusal| (reply, why, Some(tmp.clone()));
    let mut left = len;
    let mut buf = vec![0u8; 64 << 10];
    while left > 0 {
        let want = buf.len().min(left as usize);
        let n = r
            .read(buf.get_mut(..want).unwrap_or_default())
            .await
            .map_err(|e| with_tmp(refuse("451 4.3.0 read error", &e.to_string())))?;
        if n == 0 {
            return Err(with_tmp(refuse("451 4.3.0 copy cut short", "copy cut short")));
        }
        let chunk = buf.get(..n).unwrap_or_default();
        mac.update(chunk);
        f.write_all(chunk).await.map_err(|e| with_tmp(io_err(e)))?;
        left -= n as u64;
    }
    let mut sig = Vec::new();
    (&mut r)
        .take(200)
        .read_until(b'\n', &mut sig)
        .await
        .map_err(|e| with_tmp(refuse("451 4.3.0 read error", &e.to_string())))?;
    let sig = std::str::from_utf8(&sig).ok().and_then(|s| unhex(s.trim_end()));
    if sig.is_none_or(|s| mac.verify_slice(&s).is_err()) {
        return Err(with_tmp(refuse(
            "535 5.7.8 bad signature",
            "bad signature (is backup_key the same on both hosts?)",
        )));
    }
    f.sync_all().await.map_err(|e| with_tmp(io_err(e)))?;
    drop(f);
    let (tmp2, origin2) = (tmp.clone(), origin.clone());
    let held = b.dir("held");
    let res = tokio::task::spawn_blocking(move || -> Result<(), (String, String)> {
        let (inner, _) =
            Spool::inspect(&tmp2).map_err(|e| ("554 5.6.0 not a spool file".to_string(), e.to_string()))?;
        if inner != qid {
            return Err(("554 5.6.0 queue id mismatch".into(), "the file's queue id is not the header's".into()));
        }
        let odir = held.join(&origin2);
        let io = |e: std::io::Error| ("451 4.3.0 cannot hold the copy".to_string(), e.to_string());
        if !odir.is_dir() {
            std::fs::create_dir(&odir).or_else(|e| if odir.is_dir() { Ok(()) } else { Err(e) }).map_err(io)?;
            std::fs::File::open(&held).and_then(|d| d.sync_all()).map_err(io)?;
        }
        std::fs::rename(&tmp2, odir.join(qid.as_str())).map_err(io)?;
        std::fs::File::open(&odir).and_then(|d| d.sync_all()).map_err(io)?;
        Ok(())
    })
    .await
    .unwrap_or_else(|e| Err(("451 4.3.0 internal error".into(), e.to_string())));
    match res {
        Ok(()) => Ok((origin, id.to_string(), len)),
        Err((reply, why)) => Err((reply, why, Some(tmp))),
    }
}

/// The holder side: every tick, each origin's held copies against the store; confirmed
/// ones are dropped, those of an origin silent for `backup_takeover` are released.
async fn hold(b: Arc<Backup>, shared: Arc<Shared>) {
    let mut stop = shared.shutdown.clone();
    // origin -> when its silence starts counting: when its heartbeat was first seen missing
    // (this process's observation), or a heartbeat life after that for an origin this
    // process has not seen alive (its heartbeat may not have reached the store yet).
    let mut silent: HashMap<String, u64> = HashMap::new();
    let mut seen_alive: std::collections::HashSet<String> = std::collections::HashSet::new();
    let held = b.dir("held");
    loop {
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            _ = stop.changed() => break,
        }
        let dir = held.clone();
        let listing = tokio::task::spawn_blocking(move || {
            let mut out: Vec<(String, Vec<String>)> = Vec::new();
            let Ok(rd) = std::fs::read_dir(&dir) else { return out };
            for o in rd.filter_map(|e| e.ok()) {
                let Ok(origin) = o.file_name().into_string() else { continue };
                if !valid_origin(&origin) {
                    continue;
                }
                let Ok(ids) = std::fs::read_dir(o.path()) else { continue };
                let mut ids: Vec<String> = ids
                    .filter_map(|e| e.ok())
                    .filter_map(|e| e.file_name().into_string().ok())
                    .filter(|n| QueueId::parse(n).is_some())
                    .collect();
                ids.sort();
                out.push((origin, ids));
            }
            out
        })
        .await
        .unwrap_or_default();
        let state = shared.lookups();
        silent.retain(|o, _| listing.iter().any(|(l, _)| l == o));
        seen_alive.retain(|o| listing.iter().any(|(l, _)| l == o));
        for (origin, ids) in listing {
            for chunk in ids.chunks(BATCH.max(1)) {
                // A store that does not answer decides nothing: a copy is never released on
                // an unknown.
                let Ok((alive, done)) = state.state.shadow_status(&origin, chunk).await else { break };
                let now = now_ms();
                let since = if alive {
                    silent.remove(&origin);
                    seen_alive.insert(origin.clone());
                    None
                } else {
                    let grace = if seen_alive.contains(&origin) { 0 } else { HEARTBEAT_MS };
                    Some(*silent.entry(origin.clone()).or_insert(now + grace))
                };
                let mut dropped = Vec::new();
                for (id, said) in chunk.iter().zip(done) {
                    let path = held.join(&origin).join(id);
                    if said.as_deref() == Some(DONE) {
                        let _ = std::fs::remove_file(&path);
                        shared.log.event("shadow-dropped", &[("origin", &origin), ("id", id), ("reason", "confirmed")]);
                        dropped.push(id.clone());
                    } else if said.as_deref() == Some(LOST) {
                        release(&b, &shared, &origin, id, &path, Released::Unusable).await;
                        dropped.push(id.clone());
                    } else if since.is_some_and(|s| now >= s && now - s >= b.takeover_ms) {
                        let silent = now.saturating_sub(since.unwrap_or(now));
                        release(&b, &shared, &origin, id, &path, Released::Silent(silent)).await;
                    } else if Spool::inspect(&path).is_ok_and(|(_, arrived)| now.saturating_sub(arrived) > b.keep_ms) {
                        let _ = std::fs::remove_file(&path);
                        shared.log.event("shadow-dropped", &[("origin", &origin), ("id", id), ("reason", "expired")]);
                    }
                }
                if !dropped.is_empty() {
                    state.state.forget_confirmed(&origin, &dropped).await;
                }
            }
        }
    }
}

/// Why a held copy is delivered here.
enum Released {
    /// Its origin's heartbeat has been missing this long (ms), past `backup_takeover`.
    Silent(u64),
    /// Its origin quarantined its own copy in `corrupt/`.
    Unusable,
}

/// The origin of a held copy is gone, or cannot deliver it: the copy joins this host's
/// queue, same queue id.
async fn release(b: &Backup, shared: &Shared, origin: &str, id: &str, path: &Path, why: Released) {
    let (spool_dir, file) = (b.spool_dir.clone(), path.to_path_buf());
    let res = tokio::task::spawn_blocking(move || Spool::attach(&spool_dir).and_then(|s| s.adopt(&file)))
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
    let (field, value, text) = match why {
        Released::Silent(ms) => {
            let silent = format!("{}s", ms / 1000);
            let text = format!("released the copy of {origin}, silent for {silent}: delivering it here");
            ("silent", silent, text)
        }
        Released::Unusable => (
            "reason",
            "unusable at its origin".to_string(),
            format!("released the copy of {origin}, whose own is in its corrupt/: delivering it here"),
        ),
    };
    match res {
        Ok(qid) => {
            shared.log.event("shadow-released", &[("origin", origin), ("id", qid.as_str()), (field, &value)]);
            shared.log.summary("backup", crate::log::Severity::Warning, qid.as_str(), &text);
            shared.enqueued(qid.as_str());
            // A message of this host's queue now: its own peer is given a copy.
            b.retry_later();
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            // Released before (a crash between the rename and this line cannot happen:
            // the rename moves the file); a copy of an id this spool has is a duplicate.
            let _ = std::fs::remove_file(path);
            shared.log.event("shadow-dropped", &[("origin", origin), ("id", id), ("reason", "already queued here")]);
        }
        Err(e) => {
            // A copy that does not check would not deliver: kept for the administrator,
            // renamed out of the way (`ID.failed`) so it is not tried every second.
            let _ = std::fs::rename(path, path.with_extension("failed"));
            shared.log.event("shadow-release-failed", &[("origin", origin), ("id", id), ("error", &e.to_string())]);
        }
    }
}
