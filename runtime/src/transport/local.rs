//! Local delivery (R35): Maildir and mbox.
//!
//! Both add `Return-Path: <sender>` and `Delivered-To: <first recipient>`
//! on top and store the message with LF line endings, as Postfix's `local`
//! does.
//!
//! * Maildir: `cur new tmp` are created when missing; the message is
//!   written to `tmp/<unique>`, the file fsynced, hard-linked into
//!   `new/<unique>,S=<size>` (renamed when the file system has no hard
//!   links), `tmp/` entry removed, and `new/` fsynced. A crash leaves at
//!   worst a stray file in `tmp/`, never a partial message in `new/`.
//! * mbox: opened for append (created 0600 when missing), locked with
//!   `fcntl(F_SETLKW)` (the lock Dovecot and Postfix use on Linux), a
//!   `From sender date` line, the message with `>From ` quoting
//!   (mboxrd: any `>*From ` line gets one more `>`), a blank line, fsync.
//!   On a write error the file is truncated back to its old size.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::smtp::{Envelope, ForwardPath, Reply, ReversePath};

/// The reply an I/O error maps to: a full disk or quota is `452 4.2.2`,
/// a missing parent or permission problem `451 4.2.0`, anything else
/// `451 4.3.0`. All are temporary: the queue retries.
pub fn io_reply(e: &io::Error) -> Reply {
    match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => Reply::new(452, (4, 2, 2), format!("mailbox full: {e}")),
        _ => match e.kind() {
            io::ErrorKind::PermissionDenied | io::ErrorKind::NotFound => {
                Reply::new(451, (4, 2, 0), format!("mailbox unavailable: {e}"))
            }
            _ => Reply::new(451, (4, 3, 0), format!("local delivery failed: {e}")),
        },
    }
}

fn sender_text(env: &Envelope) -> String {
    match &env.from {
        ReversePath::Null => String::new(),
        ReversePath::Mailbox(m) => m.to_string(),
    }
}

fn first_rcpt(env: &Envelope) -> Option<String> {
    env.recipients.first().map(|r| match &r.path {
        ForwardPath::Postmaster => "postmaster".to_string(),
        ForwardPath::Mailbox(m) => m.to_string(),
    })
}

/// Converts CRLF (and bare CR) to LF.
fn to_lf(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len());
    let mut i = 0;
    while let Some(&b) = data.get(i) {
        if b == b'\r' {
            out.push(b'\n');
            if data.get(i + 1) == Some(&b'\n') {
                i += 1;
            }
        } else {
            out.push(b);
        }
        i += 1;
    }
    out
}

fn with_headers(env: &Envelope, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 128);
    out.extend_from_slice(format!("Return-Path: <{}>\n", sender_text(env)).as_bytes());
    if let Some(r) = first_rcpt(env) {
        out.extend_from_slice(format!("Delivered-To: {r}\n").as_bytes());
    }
    out.extend_from_slice(&to_lf(data));
    if !out.ends_with(b"\n") {
        out.push(b'\n');
    }
    out
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

fn hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
        // '/' and ':' are not allowed in maildir names
        .replace('/', "\\057")
        .replace(':', "\\072")
}

/// Delivers into the Maildir `dir`; returns the path of the file in `new/`.
pub fn deliver_maildir(dir: &Path, env: &Envelope, data: &[u8]) -> io::Result<PathBuf> {
    for sub in ["cur", "new", "tmp"] {
        fs::create_dir_all(dir.join(sub))?;
    }
    let content = with_headers(env, data);
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let unique = format!(
        "{}.M{}P{}Q{}.{}",
        now.as_secs(),
        now.subsec_micros(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
        hostname()
    );
    let tmp = dir.join("tmp").join(&unique);
    let new = dir.join("new").join(format!("{unique},S={}", content.len()));
    let result = (|| {
        let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        f.write_all(&content)?;
        f.sync_all()?;
        drop(f);
        match fs::hard_link(&tmp, &new) {
            Ok(()) => {
                fs::remove_file(&tmp)?;
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Err(e),
            Err(_) => fs::rename(&tmp, &new)?,
        }
        File::open(dir.join("new"))?.sync_all()?;
        Ok(new.clone())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// asctime-style date for the `From ` line: `Mon Jan  2 15:04:05 2006`.
fn asctime(secs: u64) -> String {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (y, m, d) = crate::conn::civil_from_days(days as i64);
    let wd = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"].get((days % 7) as usize).copied().unwrap_or("Thu");
    let mon = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
        .get((m as usize).saturating_sub(1))
        .copied()
        .unwrap_or("Jan");
    format!("{wd} {mon} {d:>2} {:02}:{:02}:{:02} {y}", rem / 3600, (rem % 3600) / 60, rem % 60)
}

/// mboxrd quoting: a line matching `>*From ` gets one more `>`.
fn quote_from(content: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(content.len() + 16);
    for line in content.split_inclusive(|&b| b == b'\n') {
        let stripped = {
            let mut i = 0;
            while line.get(i) == Some(&b'>') {
                i += 1;
            }
            line.get(i..).unwrap_or_default()
        };
        if stripped.starts_with(b"From ") {
            out.push(b'>');
        }
        out.extend_from_slice(line);
    }
    out
}

struct FcntlLock<'a>(&'a File);

impl<'a> FcntlLock<'a> {
    fn lock(f: &'a File) -> io::Result<FcntlLock<'a>> {
        use std::os::unix::io::AsRawFd;
        // SAFETY: flock is plain data; zeroed is a valid value.
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = libc::F_WRLCK as _;
        fl.l_whence = libc::SEEK_SET as _;
        loop {
            // SAFETY: valid fd owned by `f`, valid pointer to `fl`.
            let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETLKW, &fl) };
            if r == 0 {
                return Ok(FcntlLock(f));
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

impl Drop for FcntlLock<'_> {
    fn drop(&mut self) {
        use std::os::unix::io::AsRawFd;
        // SAFETY: as above.
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = libc::F_UNLCK as _;
        fl.l_whence = libc::SEEK_SET as _;
        // SAFETY: as above.
        unsafe { libc::fcntl(self.0.as_raw_fd(), libc::F_SETLK, &fl) };
    }
}

/// Appends to the mbox file `path`.
pub fn deliver_mbox(path: &Path, env: &Envelope, data: &[u8]) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = OpenOptions::new().append(true).create(true).mode(0o600).open(path)?;
    let _lock = FcntlLock::lock(&f)?;
    let old_len = f.metadata()?.len();
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    let sender = match sender_text(env) {
        s if s.is_empty() => "MAILER-DAEMON".to_string(),
        s => s,
    };
    let mut buf = format!("From {sender} {}\n", asctime(secs)).into_bytes();
    buf.extend_from_slice(&quote_from(&with_headers(env, data)));
    buf.push(b'\n');
    let mut w = &f;
    let r = w.write_all(&buf).and_then(|_| f.sync_all());
    if let Err(e) = r {
        let _ = f.set_len(old_len);
        let _ = f.sync_all();
        return Err(e);
    }
    Ok(())
}
