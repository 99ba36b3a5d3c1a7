//! The control socket: how `mailc queue` and `mailc reload` reach a running daemon, so a
//! change takes effect at once instead of at the next queue run (Postfix's `postqueue -f`
//! asking the queue manager through its `public/` socket).
//!
//! A unix stream socket at `SPOOL/private/control`, mode 0600 in a directory of mode 0700
//! (both the daemon's own), and only peers whose uid is root's or the daemon's are
//! answered (`SO_PEERCRED`). One request per connection, one JSON line each way:
//!
//! ```text
//! {"op":"flush","domain":"example.org"}     {"op":"hold","id":"..."}   {"op":"reload"}
//! {"ok":true,"code":0,"text":"1 message flushed"}   {"ok":false,"code":1,"text":"no message ..."}
//! ```
//!
//! The spool's files stay the source of truth: the daemon makes each change in the spool
//! exactly as `mailc queue` does when no daemon runs ([`apply`]), then updates its
//! scheduler (the queue manager, `qmgr.rs`), so the two paths cannot disagree.

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

use crate::spool::{QueueId, QueueName, Spool};

/// The socket's path under the spool.
pub fn socket_path(spool: &Path) -> PathBuf {
    spool.join("private").join("control")
}

/// One request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Op {
    Hold {
        id: String,
    },
    Release {
        id: String,
    },
    Delete {
        id: String,
    },
    Requeue {
        id: String,
    },
    Flush {
        domain: Option<String>,
    },
    /// Recompile the policy and swap it in (a policy with errors is refused, the old one stays).
    Reload,
}

/// The answer: `code` is the command's exit code (0 done, 1 no such message or refused,
/// 2 an I/O error).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answer {
    pub ok: bool,
    pub code: u8,
    pub text: String,
}

impl Answer {
    pub fn ok(text: impl Into<String>) -> Answer {
        Answer { ok: true, code: 0, text: text.into() }
    }
    pub fn fail(code: u8, text: impl Into<String>) -> Answer {
        Answer { ok: false, code, text: text.into() }
    }
}

/// A request as the daemon's main loop receives it, with where to send the answer.
pub type Request = (Op, oneshot::Sender<Answer>);

fn failure(e: io::Error, id: &QueueId) -> Answer {
    if e.kind() == io::ErrorKind::NotFound {
        Answer::fail(1, format!("no message {id} in the queue"))
    } else {
        Answer::fail(2, e.to_string())
    }
}

fn parse_id(id: &str) -> Result<QueueId, Answer> {
    QueueId::parse(id.trim_end_matches(['*', '!'])).ok_or_else(|| Answer::fail(2, format!("{id:?} is not a queue id")))
}

/// Makes `op`'s change in the spool's files (not [`Op::Reload`]): what `mailc queue` does
/// without a daemon, and what the daemon does before telling its scheduler. Returns the
/// answer and the ids changed.
pub fn apply(spool: &Spool, op: &Op, now: u64) -> (Answer, Vec<QueueId>) {
    let one = |id: &str, f: &dyn Fn(&QueueId) -> Result<String, Answer>| match parse_id(id) {
        Err(a) => (a, Vec::new()),
        Ok(q) => match f(&q) {
            Ok(t) => (Answer::ok(t), vec![q]),
            Err(a) => (a, Vec::new()),
        },
    };
    match op {
        Op::Hold { id } => one(id, &|q| {
            spool.move_to(q, QueueName::Hold).map_err(|e| failure(e, q))?;
            Ok(format!("{q}: placed on hold"))
        }),
        Op::Release { id } => one(id, &|q| {
            let s = spool.summary(q).map_err(|e| failure(e, q))?;
            if s.queue != QueueName::Hold {
                return Err(Answer::fail(1, format!("{q} is not on hold (it is in {})", s.queue.as_str())));
            }
            spool.move_to(q, QueueName::Deferred).and_then(|()| spool.make_due(q, now)).map_err(|e| failure(e, q))?;
            Ok(format!("{q}: released from hold"))
        }),
        Op::Delete { id } => one(id, &|q| {
            spool.remove(q).map_err(|e| failure(e, q))?;
            Ok(format!("{q}: deleted"))
        }),
        // Back to `incoming/` with deferred recipients pending again, due now (also
        // releases a hold).
        Op::Requeue { id } => one(id, &|q| {
            spool
                .reset_deferred(q, now)
                .and_then(|()| spool.move_to(q, QueueName::Incoming))
                .map_err(|e| failure(e, q))?;
            Ok(format!("{q}: requeued"))
        }),
        Op::Flush { domain } => match flush(spool, domain.as_deref(), now) {
            Ok(ids) => {
                let n = ids.len();
                (Answer::ok(format!("{n} message{} flushed", if n == 1 { "" } else { "s" })), ids)
            }
            Err(e) => (Answer::fail(2, e.to_string()), Vec::new()),
        },
        Op::Reload => (Answer::fail(2, "reload needs the daemon"), Vec::new()),
    }
}

/// Makes every message waiting in `incoming/` or `deferred/` due now; with a domain, only
/// those with an unfinished recipient in that domain. Returns their ids.
fn flush(spool: &Spool, domain: Option<&str>, now: u64) -> io::Result<Vec<QueueId>> {
    let mut out = Vec::new();
    for s in spool.list()? {
        if !matches!(s.queue, QueueName::Incoming | QueueName::Deferred) {
            continue;
        }
        let hit = match domain {
            None => true,
            Some(d) => s.rcpts.iter().any(|r| {
                !r.state.is_final() && r.address.rsplit_once('@').is_some_and(|(_, dom)| dom.eq_ignore_ascii_case(d))
            }),
        };
        if !hit {
            continue;
        }
        match spool.make_due(&s.id, now) {
            Ok(()) => out.push(s.id.clone()),
            // Delivered and removed while we looked: nothing to flush.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// Binds the unix socket `path` (`what` names it in errors) in its directory, made with
/// and set to `dir_mode`, the socket set to `mode`. A socket left by a daemon that did not
/// stop cleanly (nobody answers on it) is replaced; one another daemon answers on is not.
fn bind(path: &Path, what: &str, dir_mode: u32, mode: u32) -> Result<tokio::net::UnixListener, String> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let err = |e: io::Error| format!("{what} {}: {e}", path.display());
    if let Some(dir) = path.parent() {
        if !dir.is_dir() {
            std::fs::DirBuilder::new().recursive(true).mode(dir_mode).create(dir).map_err(err)?;
        }
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(dir_mode)).map_err(err)?;
    }
    if std::fs::symlink_metadata(path).is_ok() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(format!("{what} {}: another daemon answers on it", path.display()));
        }
        std::fs::remove_file(path).map_err(err)?;
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(err)?;
    Ok(listener)
}

/// Binds the socket (replacing a stale one) and answers requests until shutdown, passing
/// each to `to_main`.
pub fn listen(
    spool: &Path,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
    to_main: mpsc::UnboundedSender<Request>,
    log: crate::log::Logger,
) -> Result<PathBuf, String> {
    let path = socket_path(spool);
    let listener = bind(&path, "control socket", 0o700, 0o600)?;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    let p = path.clone();
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = shutdown.changed() => break,
            };
            let Ok((stream, _)) = accepted else {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            };
            let uid = stream.peer_cred().map(|c| c.uid()).ok();
            let tx = to_main.clone();
            tokio::spawn(async move {
                let _ = serve_one(stream, uid.filter(|u| *u == 0 || *u == me).is_some(), tx, log).await;
            });
        }
        let _ = std::fs::remove_file(&p);
    });
    Ok(path)
}

async fn serve_one(
    stream: tokio::net::UnixStream,
    allowed: bool,
    to_main: mpsc::UnboundedSender<Request>,
    log: crate::log::Logger,
) -> io::Result<()> {
    let (r, mut w) = stream.into_split();
    let answer = if !allowed {
        Answer::fail(2, "permission denied: only root and the daemon's user may use the control socket")
    } else {
        // One line, at most 64 KiB, within 10 seconds.
        let mut line = String::new();
        let mut r = tokio::io::BufReader::new(tokio::io::AsyncReadExt::take(r, 64 * 1024));
        let read = tokio::time::timeout(std::time::Duration::from_secs(10), r.read_line(&mut line)).await;
        match read {
            Ok(Ok(_)) => match serde_json::from_str::<Op>(line.trim()) {
                Err(e) => Answer::fail(2, format!("bad request: {e}")),
                Ok(op) => {
                    log.event("control", &[("request", line.trim())]);
                    let (tx, rx) = oneshot::channel();
                    if to_main.send((op, tx)).is_err() {
                        Answer::fail(2, "the daemon is stopping")
                    } else {
                        rx.await.unwrap_or_else(|_| Answer::fail(2, "the daemon is stopping"))
                    }
                }
            },
            _ => Answer::fail(2, "no request"),
        }
    };
    let mut out = serde_json::to_string(&answer).unwrap_or_default();
    out.push('\n');
    w.write_all(out.as_bytes()).await?;
    w.shutdown().await
}

/// What a client gets from [`request`].
pub enum Reached {
    /// The daemon answered.
    Answered(Answer),
    /// No daemon listens on the socket (it is missing, or stale): why.
    NoDaemon(String),
}

/// Sends `op` to the daemon of `spool` and waits for its answer (blocking; the client side,
/// for `mailc`).
pub fn request(spool: &Path, op: &Op, wait: std::time::Duration) -> Reached {
    use std::io::{BufRead, Write};
    let path = socket_path(spool);
    let mut s = match std::os::unix::net::UnixStream::connect(&path) {
        Ok(s) => s,
        Err(e) => return Reached::NoDaemon(format!("{}: {e}", path.display())),
    };
    let _ = s.set_read_timeout(Some(wait));
    let mut line = serde_json::to_string(op).unwrap_or_default();
    line.push('\n');
    if let Err(e) = s.write_all(line.as_bytes()) {
        return Reached::Answered(Answer::fail(2, format!("control socket {}: {e}", path.display())));
    }
    let mut back = String::new();
    match std::io::BufReader::new(s).read_line(&mut back) {
        Ok(n) if n > 0 => match serde_json::from_str::<Answer>(back.trim()) {
            Ok(a) => Reached::Answered(a),
            Err(e) => Reached::Answered(Answer::fail(2, format!("control socket: bad answer: {e}"))),
        },
        Ok(_) => Reached::Answered(Answer::fail(2, "control socket: the daemon closed without an answer")),
        Err(e) => Reached::Answered(Answer::fail(2, format!("control socket {}: {e}", path.display()))),
    }
}

/// The public listing socket, `SPOOL/public/showq` (Postfix's `public/showq`): what lets
/// `mailq` work for every local user although the queue's directories are the daemon's
/// alone (mode 0700). It only lists: a connection gets one JSON line, the [`Listing`] of
/// the queue, and is closed; nothing the peer writes is read, so there is no request to
/// parse. Any local user may list (Postfix's default, `authorized_mailq_users =
/// static:anyone`); envelope addresses and sizes are what it shows, never message data.
/// Listings are made one at a time, so a user who connects in a loop costs one spool scan
/// at a time.
pub fn showq_path(spool: &Path) -> PathBuf {
    spool.join("public").join("showq")
}

/// The queue as the listing socket sends it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Listing {
    pub messages: Vec<crate::spool::Summary>,
    /// The files quarantined in `corrupt/`.
    pub corrupt: Vec<String>,
}

/// The listing of `spool`, read from its files.
pub fn listing(spool: &Spool) -> io::Result<Listing> {
    Ok(Listing { messages: spool.list()?, corrupt: spool.list_corrupt()? })
}

/// Binds the listing socket (directory 0755, socket 0666) and answers until shutdown.
pub fn listen_showq(
    spool: Spool,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
    log: crate::log::Logger,
) -> Result<PathBuf, String> {
    let path = showq_path(spool.dir());
    let listener = bind(&path, "listing socket", 0o755, 0o666)?;
    let one_at_a_time = std::sync::Arc::new(tokio::sync::Semaphore::new(1));
    let p = path.clone();
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = shutdown.changed() => break,
            };
            let Ok((mut stream, _)) = accepted else {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            };
            let (spool, gate) = (spool.clone(), one_at_a_time.clone());
            tokio::spawn(async move {
                let Ok(_permit) = gate.acquire_owned().await else { return };
                let made = tokio::task::spawn_blocking(move || listing(&spool)).await;
                let mut line = match made {
                    Ok(Ok(l)) => serde_json::to_string(&l).unwrap_or_default(),
                    Ok(Err(e)) => {
                        log.event("showq", &[("error", &e.to_string())]);
                        String::new()
                    }
                    Err(_) => String::new(),
                };
                line.push('\n');
                let write = async {
                    stream.write_all(line.as_bytes()).await?;
                    stream.shutdown().await
                };
                let _ = tokio::time::timeout(std::time::Duration::from_secs(60), write).await;
            });
        }
        let _ = std::fs::remove_file(&p);
    });
    Ok(path)
}

/// Asks the daemon of `spool` for the listing (blocking; the client side, for `mailq` run
/// by a user who cannot read the queue's directories).
pub fn request_listing(spool: &Path, wait: std::time::Duration) -> Result<Listing, String> {
    use std::io::BufRead;
    let path = showq_path(spool);
    let s = std::os::unix::net::UnixStream::connect(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let _ = s.set_read_timeout(Some(wait));
    let mut line = String::new();
    std::io::BufReader::new(s).read_line(&mut line).map_err(|e| format!("{}: {e}", path.display()))?;
    if line.trim().is_empty() {
        return Err(format!("{}: the daemon could not read the queue (see its log)", path.display()));
    }
    serde_json::from_str(line.trim()).map_err(|e| format!("{}: bad answer: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_as_json() {
        for op in [
            Op::Hold { id: "x".into() },
            Op::Flush { domain: None },
            Op::Flush { domain: Some("example.org".into()) },
            Op::Reload,
        ] {
            let j = serde_json::to_string(&op).unwrap();
            assert_eq!(serde_json::from_str::<Op>(&j).unwrap(), op);
        }
        assert_eq!(serde_json::to_string(&Op::Reload).unwrap(), r#"{"op":"reload"}"#);
        assert!(serde_json::from_str::<Op>(r#"{"op":"rm -rf"}"#).is_err());
    }
}
