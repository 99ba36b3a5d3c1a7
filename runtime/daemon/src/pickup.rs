//! The maildrop pickup: local submissions (`mailc sendmail`, `spool/maildrop.rs`) enter the
//! daemon through the policy like any other mail, as Postfix's `pickup` hands them to
//! `cleanup`.
//!
//! Each file is replayed as an SMTP session of the listener named `local`, driven by the
//! daemon's own session loop over an in-process pipe (no socket): the client is
//! `127.0.0.1`, authenticated from the start as the file's owner (`auth.user`, mechanism
//! `local`). What the policy accepts is queued; what it refuses permanently is returned to
//! the sender in a DSN; what it defers stays in the maildrop (with only the deferred
//! recipients) and is tried again after a minute. A file that is not a maildrop file, or that
//! is a symbolic link, is moved to `corrupt/` with a log line.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

use super::session::{self, Incoming};
use super::{now_ms, ListenerRt, Shared};
use crate::record::Class;
use crate::record::{QueuedMessage, QueuedRcpt, SessionRecord};
use crate::smtp::{Reply, ReversePath};
use crate::spool::maildrop::{self, Submission};
use crate::spool::Spool;
use crate::transport::driver::DeliveryOutcome;
use crate::transport::dsn::{self, DsnRecipient, NoticeKind};

/// How often the maildrop is looked at (Postfix's pickup is woken by `postdrop`; a one
/// second scan is as prompt for cron and scripts).
const SCAN: Duration = Duration::from_secs(1);
/// A file deferred by the policy waits this long before the next try.
const RETRY: u64 = 60_000;

/// What the policy said to one submission.
#[derive(Debug, Default, PartialEq, Eq)]
struct Result {
    /// Recipients taken (the message is queued for them).
    accepted: Vec<String>,
    /// Refused permanently, with the reply.
    refused: Vec<(String, String)>,
    /// Refused for now: tried again later.
    deferred: Vec<String>,
}

/// Run the pickup until the daemon shuts down.
pub fn spawn(shared: Arc<Shared>, listener: Arc<ListenerRt>, spool: Spool, spool_dir: PathBuf) {
    let dir = spool_dir.join(maildrop::DIR);
    if !dir.is_dir() {
        if let Err(e) = crate::privileges::maildrop_dir(&dir, None) {
            shared.log.event("pickup-failed", &[("dir", &dir.display().to_string()), ("error", &e.to_string())]);
        }
    }
    tokio::spawn(async move {
        let mut shutdown = shared.shutdown.clone();
        let mut retry_at: HashMap<PathBuf, u64> = HashMap::new();
        let mut n = 0u64;
        loop {
            if *shutdown.borrow() {
                break;
            }
            for path in due(&dir) {
                if retry_at.get(&path).is_some_and(|t| *t > now_ms()) {
                    continue;
                }
                n += 1;
                // The local listener's settings of the last good load (a reload swaps them).
                let lst = shared.listener(&listener.name).unwrap_or_else(|| listener.clone());
                match one(&shared, &lst, &spool, &spool_dir, &path, n).await {
                    Keep::Retry => {
                        retry_at.insert(path, now_ms() + RETRY);
                    }
                    Keep::Done => {
                        retry_at.remove(&path);
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(SCAN) => {}
                _ = shutdown.changed() => {}
            }
        }
    });
}

/// Finished files, oldest first (names start with the submission time).
fn due(dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut v: Vec<PathBuf> =
        rd.flatten().filter(|e| !e.file_name().to_string_lossy().starts_with('.')).map(|e| e.path()).collect();
    v.sort();
    v
}

enum Keep {
    Retry,
    Done,
}

async fn one(
    shared: &Arc<Shared>,
    lst: &Arc<ListenerRt>,
    spool: &Spool,
    spool_dir: &Path,
    path: &Path,
    n: u64,
) -> Keep {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let log = shared.log;
    let name = path.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    // The owner is the submitting user; a link is never followed.
    // File I/O runs on the blocking pool, never on a worker the sessions share.
    let limit = lst.engine.max_message_size.saturating_add(1 << 20);
    let p = path.to_path_buf();
    let read = tokio::task::spawn_blocking(move || {
        let f = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(&p)?;
        let meta = f.metadata()?;
        if !meta.is_file() {
            return Err(std::io::Error::other("not a regular file"));
        }
        let mut v = Vec::new();
        std::io::Read::read_to_end(&mut std::io::Read::take(&f, limit), &mut v)?;
        Ok((v, meta.uid()))
    })
    .await;
    let read = match read {
        Ok(r) => r,
        Err(e) => {
            log.event("pickup-deferred", &[("file", &name), ("error", &e.to_string())]);
            return Keep::Retry;
        }
    };
    let (bytes, uid) = match read {
        Ok(x) => x,
        Err(e) => {
            corrupt(shared, spool_dir, path, &name, &e.to_string());
            return Keep::Done;
        }
    };
    let sub = match maildrop::decode(&bytes) {
        Ok(s) => s,
        Err(e) => {
            corrupt(shared, spool_dir, path, &name, &e);
            return Keep::Done;
        }
    };
    // A `U` line is the daemon's own record, in a file it rewrote (maildrop.rs); in a file
    // anyone else owns it is a forgery.
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    let user = match &sub.user {
        None => maildrop::user_of(uid).0,
        Some(u) if uid == me || uid == 0 => u.clone(),
        Some(_) => {
            corrupt(shared, spool_dir, path, &name, "a U line in a file the daemon did not write");
            return Keep::Done;
        }
    };
    let sender = sub.sender.clone().unwrap_or_else(|| format!("{user}@{}", shared.hostname));
    let (client, server) = tokio::io::duplex(64 * 1024);
    let id = format!("local-{n}");
    let at: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 0));
    let s = shared.clone();
    let l = lst.clone();
    let sid = id.clone();
    let u = user.clone();
    let task = tokio::spawn(async move {
        session::run(s, l, Incoming::Local { stream: server, user: u }, at, at, sid).await;
    });
    let r = converse(client, &sender, &sub).await;
    let _ = task.await;
    let r = match r {
        Ok(r) => r,
        Err(e) => {
            log.event("pickup-deferred", &[("file", &name), ("user", &user), ("error", &e)]);
            return Keep::Retry;
        }
    };
    log.event(
        "pickup",
        &[
            ("file", &name),
            ("session", &id),
            ("uid", &uid.to_string()),
            ("user", &user),
            ("from", &sender),
            ("accepted", &r.accepted.len().to_string()),
            ("refused", &r.refused.len().to_string()),
            ("deferred", &r.deferred.len().to_string()),
        ],
    );
    let (sh, sp, p) = (shared.clone(), spool.clone(), path.to_path_buf());
    let done = tokio::task::spawn_blocking(move || {
        if !r.refused.is_empty() {
            bounce(&sh, &sp, &sender, &sub.message, &r.refused);
        }
        if r.deferred.is_empty() {
            let _ = std::fs::remove_file(&p);
            if let Some(d) = p.parent() {
                let _ = std::fs::File::open(d).and_then(|d| d.sync_all());
            }
            return Keep::Done;
        }
        // Only the deferred recipients stay, in a file of the same name.
        // The daemon owns the rewritten file: the submitter is recorded in it.
        let rest = Submission { recipients: r.deferred.clone(), user: Some(user.clone()), ..sub };
        if let Ok(b) = maildrop::encode(&rest) {
            let tmp = p.with_file_name(format!(".{name}.retry"));
            if std::fs::write(&tmp, b).and_then(|_| std::fs::rename(&tmp, &p)).is_err() {
                let _ = std::fs::remove_file(&tmp);
            }
        }
        Keep::Retry
    })
    .await;
    // A panic on the blocking pool leaves the file where it was: tried again.
    done.unwrap_or(Keep::Retry)
}

fn corrupt(shared: &Shared, spool_dir: &Path, path: &Path, name: &str, why: &str) {
    let dir = spool_dir.join("corrupt");
    let _ = std::fs::create_dir_all(&dir);
    let to = dir.join(format!("maildrop-{name}"));
    let moved = std::fs::rename(path, &to).or_else(|_| std::fs::remove_file(path));
    shared.log.event(
        "pickup-corrupt",
        &[("file", name), ("error", why), ("moved", if moved.is_ok() { "corrupt/" } else { "no" })],
    );
}

/// A non-delivery notice to the local sender for what the policy refused.
fn bounce(shared: &Shared, spool: &Spool, sender: &str, message: &[u8], refused: &[(String, String)]) {
    if sender.is_empty() {
        return;
    }
    let now = now_ms();
    let rp = crate::smtp::parse_reverse_path(&format!("<{sender}>"), true).unwrap_or(ReversePath::Null);
    let entries: Vec<DsnRecipient> = refused
        .iter()
        .map(|(to, reply)| {
            let r = Reply::parse(reply).unwrap_or_else(|| Reply::new(550, (5, 0, 0), reply.clone()));
            DsnRecipient::from_outcome(NoticeKind::Failure, to, None, &DeliveryOutcome::Failed(r), None, now)
        })
        .collect();
    let d = dsn::Dsn {
        kind: NoticeKind::Failure,
        hostname: &shared.hostname,
        sender: &rp,
        envid: None,
        ret: Some(crate::smtp::Ret::Hdrs),
        arrival_date: now,
        now,
        recipients: &entries,
        message,
        size_limit: 50_000,
        utf8: dsn::Dsn::needs_global(false, &rp, &entries),
    };
    let prog = shared.program();
    let msg = QueuedMessage {
        sender: String::new(),
        recipients: vec![QueuedRcpt {
            address: sender.to_string(),
            notify: vec!["NEVER".into()],
            ..Default::default()
        }],
        data: dsn::build_dsn(&d),
        client_ip: "127.0.0.1".into(),
        helo: shared.hostname.clone(),
        session: SessionRecord::internal(&prog, &shared.hostname),
        ..Default::default()
    };
    match spool.store(&msg, Class::Bounce, now) {
        Ok(id) => {
            shared.log.event("dsn", &[("kind", "failure"), ("to", sender), ("dsn_id", id.as_str()), ("by", "pickup")]);
            shared.enqueued(id.as_str());
        }
        Err(e) => shared.log.event("dsn-failed", &[("to", sender), ("error", &e.to_string())]),
    }
}

/// Reads one reply (all its lines); returns the last line (`250 2.0.0 text`).
async fn reply(s: &mut DuplexStream, buf: &mut Vec<u8>) -> std::result::Result<String, String> {
    loop {
        while let Some(n) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=n).collect();
            let text = String::from_utf8_lossy(&line).trim_end().to_string();
            if text.as_bytes().get(3) != Some(&b'-') {
                return Ok(text);
            }
        }
        let mut chunk = [0u8; 4096];
        let got = tokio::time::timeout(Duration::from_secs(600), s.read(&mut chunk))
            .await
            .map_err(|_| "the session did not answer".to_string())?
            .map_err(|e| e.to_string())?;
        if got == 0 {
            return Err("the session closed".into());
        }
        buf.extend_from_slice(chunk.get(..got).unwrap_or_default());
    }
}

fn class(line: &str) -> u8 {
    line.as_bytes().first().copied().unwrap_or(b'4')
}

async fn send(s: &mut DuplexStream, line: String) -> std::result::Result<(), String> {
    s.write_all(line.as_bytes()).await.map_err(|e| e.to_string())
}

/// The submission as an SMTP client would send it.
async fn converse(mut s: DuplexStream, sender: &str, sub: &Submission) -> std::result::Result<Result, String> {
    let mut buf = Vec::new();
    let greeting = reply(&mut s, &mut buf).await?;
    if class(&greeting) != b'2' {
        return Err(format!("greeting: {greeting}"));
    }
    send(&mut s, "EHLO localhost\r\n".into()).await?;
    let ehlo = reply(&mut s, &mut buf).await?;
    if class(&ehlo) != b'2' {
        return Err(format!("EHLO: {ehlo}"));
    }
    let mut params = String::new();
    if sub.message.iter().any(|b| *b >= 0x80) {
        params.push_str(" BODY=8BITMIME");
    }
    if !sender.is_ascii() || sub.recipients.iter().any(|r| !r.is_ascii()) {
        params.push_str(" SMTPUTF8");
    }
    send(&mut s, format!("MAIL FROM:<{sender}>{params}\r\n")).await?;
    let mail = reply(&mut s, &mut buf).await?;
    let mut r = Result::default();
    match class(&mail) {
        b'2' => {}
        b'5' => {
            r.refused = sub.recipients.iter().map(|t| (t.clone(), mail.clone())).collect();
            let _ = send(&mut s, "QUIT\r\n".into()).await;
            return Ok(r);
        }
        _ => return Err(format!("MAIL: {mail}")),
    }
    let mut taken = Vec::new();
    for to in &sub.recipients {
        send(&mut s, format!("RCPT TO:<{to}>\r\n")).await?;
        let a = reply(&mut s, &mut buf).await?;
        match class(&a) {
            b'2' => taken.push(to.clone()),
            b'5' => r.refused.push((to.clone(), a)),
            _ => r.deferred.push(to.clone()),
        }
    }
    if taken.is_empty() {
        let _ = send(&mut s, "QUIT\r\n".into()).await;
        return Ok(r);
    }
    send(&mut s, "DATA\r\n".into()).await?;
    let go = reply(&mut s, &mut buf).await?;
    if class(&go) != b'3' {
        return match class(&go) {
            b'5' => {
                r.refused.extend(taken.into_iter().map(|t| (t, go.clone())));
                Ok(r)
            }
            _ => {
                r.deferred.extend(taken);
                Ok(r)
            }
        };
    }
    // Line ends to CRLF, leading dots doubled (RFC 5321 4.5.2).
    let mut out = Vec::with_capacity(sub.message.len() + 1024);
    for line in sub.message.split_inclusive(|b| *b == b'\n') {
        let body = line.strip_suffix(b"\n").unwrap_or(line);
        let body = body.strip_suffix(b"\r").unwrap_or(body);
        if body.first() == Some(&b'.') {
            out.push(b'.');
        }
        out.extend_from_slice(body);
        out.extend_from_slice(b"\r\n");
        if out.len() >= 60 * 1024 {
            s.write_all(&out).await.map_err(|e| e.to_string())?;
            out.clear();
        }
    }
    out.extend_from_slice(b".\r\n");
    s.write_all(&out).await.map_err(|e| e.to_string())?;
    let end = reply(&mut s, &mut buf).await?;
    let _ = send(&mut s, "QUIT\r\n".into()).await;
    match class(&end) {
        b'2' => r.accepted = taken,
        b'5' => r.refused.extend(taken.into_iter().map(|t| (t, end.clone()))),
        _ => r.deferred.extend(taken),
    }
    Ok(r)
}
