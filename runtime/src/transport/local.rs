//! Local delivery (R35): Maildir and mbox.
//!
//! Both add `Return-Path: <sender>` and `Delivered-To: <first recipient>`
//! on top and store the message with LF line endings (CRLF becomes LF; a bare CR
//! stays), as Postfix's `local` does.
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
    if let Some(esc) = e.get_ref().and_then(|x| x.downcast_ref::<EscapedPath>()) {
        return Reply::new(550, (5, 7, 1), format!("delivery path refused: {esc}"));
    }
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

/// Converts CRLF to LF. A bare CR is content (a BINARYMIME body may hold any byte): it
/// stays, so the mailbox holds the message as it was sent.
fn to_lf(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len());
    let mut i = 0;
    while let Some(&b) = data.get(i) {
        if b == b'\r' && data.get(i + 1) == Some(&b'\n') {
            out.push(b'\n');
            i += 1;
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
    append_mbox(f, env, data)
}

fn append_mbox(f: File, env: &Envelope, data: &[u8]) -> io::Result<()> {
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

// ---------------------------------------------------------------- confined delivery paths

/// A delivery path that would leave its directory: a symbolic link (or a non-directory)
/// below the confining root, which is never followed. A permanent failure (`550 5.7.1`).
#[derive(Debug)]
pub struct EscapedPath(pub String);

impl std::fmt::Display for EscapedPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for EscapedPath {}

fn c_name(name: &std::ffi::OsStr) -> io::Result<std::ffi::CString> {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(name.as_bytes()).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a path"))
}

/// `openat(dir, name, O_DIRECTORY | O_NOFOLLOW)`: a symbolic link or a file there is an
/// [`EscapedPath`].
fn open_dir_at(dir: &std::os::fd::OwnedFd, name: &std::ffi::OsStr, shown: &Path) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::{AsRawFd, FromRawFd};
    let c = c_name(name)?;
    // SAFETY: a valid directory descriptor and a NUL-terminated name; the result is checked.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            c.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        let e = io::Error::last_os_error();
        return Err(match e.raw_os_error() {
            Some(libc::ELOOP) | Some(libc::ENOTDIR) => io::Error::other(EscapedPath(format!(
                "{} is a symbolic link or not a directory (never followed below the delivery root)",
                shown.display()
            ))),
            _ => e,
        });
    }
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// `mkdirat(dir, name, 0700)`; an existing entry is fine (it is opened without following).
fn mkdir_at(dir: &std::os::fd::OwnedFd, name: &std::ffi::OsStr) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let c = c_name(name)?;
    // SAFETY: as in open_dir_at.
    if unsafe { libc::mkdirat(dir.as_raw_fd(), c.as_ptr(), 0o700) } < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EEXIST) {
            return Err(e);
        }
    }
    Ok(())
}

/// The directory `c.path`, walked from `c.root` one component at a time with `openat`:
/// missing directories are created, and no symbolic link below the root is followed (the
/// root itself is the administrator's and may be one).
fn open_confined_dir(root: &Path, rel: &Path) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    use std::path::Component;
    fs::create_dir_all(root)?;
    let c = c_name(root.as_os_str())?;
    // SAFETY: a NUL-terminated path; the result is checked.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor nothing else owns.
    let mut dir = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    let mut shown = root.to_path_buf();
    for comp in rel.components() {
        let Component::Normal(name) = comp else {
            return Err(io::Error::other(EscapedPath(format!("{} leaves {}", rel.display(), root.display()))));
        };
        shown.push(name);
        mkdir_at(&dir, name)?;
        dir = open_dir_at(&dir, name, &shown)?;
    }
    Ok(dir)
}

/// [`deliver_maildir`] for a confined path: every directory below the root is opened
/// without following symbolic links, and the message file is created, linked and renamed
/// relative to those descriptors, never through a path a link could redirect.
pub fn deliver_maildir_in(c: &crate::paths::Confined, env: &Envelope, data: &[u8]) -> io::Result<PathBuf> {
    use std::os::fd::{AsRawFd, FromRawFd};
    let Some(root) = &c.root else { return deliver_maildir(&c.path, env, data) };
    let rel = crate::paths::confine(root, &c.path).map_err(|e| io::Error::other(EscapedPath(e.to_string())))?;
    let dir = open_confined_dir(root, &rel)?;
    for sub in ["cur", "new", "tmp"] {
        mkdir_at(&dir, std::ffi::OsStr::new(sub))?;
    }
    let tmp = open_dir_at(&dir, std::ffi::OsStr::new("tmp"), &c.path.join("tmp"))?;
    let new = open_dir_at(&dir, std::ffi::OsStr::new("new"), &c.path.join("new"))?;
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
    let final_name = format!("{unique},S={}", content.len());
    let (cu, cf) = (c_name(std::ffi::OsStr::new(&unique))?, c_name(std::ffi::OsStr::new(&final_name))?);
    // SAFETY: valid descriptors and NUL-terminated names; results are checked.
    let fd = unsafe {
        libc::openat(
            tmp.as_raw_fd(),
            cu.as_ptr(),
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            0o600 as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor nothing else owns.
    let mut f = unsafe { File::from_raw_fd(fd) };
    let result = (|| {
        f.write_all(&content)?;
        f.sync_all()?;
        // SAFETY: as above.
        if unsafe { libc::linkat(tmp.as_raw_fd(), cu.as_ptr(), new.as_raw_fd(), cf.as_ptr(), 0) } < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EEXIST) {
                return Err(e);
            }
            // SAFETY: as above.
            if unsafe { libc::renameat(tmp.as_raw_fd(), cu.as_ptr(), new.as_raw_fd(), cf.as_ptr()) } < 0 {
                return Err(io::Error::last_os_error());
            }
        } else {
            // SAFETY: as above.
            unsafe { libc::unlinkat(tmp.as_raw_fd(), cu.as_ptr(), 0) };
        }
        // SAFETY: a valid descriptor.
        if unsafe { libc::fsync(new.as_raw_fd()) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(c.path.join("new").join(&final_name))
    })();
    if result.is_err() {
        // SAFETY: as above.
        unsafe { libc::unlinkat(tmp.as_raw_fd(), cu.as_ptr(), 0) };
    }
    result
}

/// [`deliver_mbox`] for a confined path: its directories walked without following
/// symbolic links, the file opened with `O_NOFOLLOW` relative to its directory.
pub fn deliver_mbox_in(c: &crate::paths::Confined, env: &Envelope, data: &[u8]) -> io::Result<()> {
    use std::os::fd::{AsRawFd, FromRawFd};
    let Some(root) = &c.root else { return deliver_mbox(&c.path, env, data) };
    let rel = crate::paths::confine(root, &c.path).map_err(|e| io::Error::other(EscapedPath(e.to_string())))?;
    let (Some(parent), Some(name)) = (rel.parent(), rel.file_name()) else {
        return Err(io::Error::other(EscapedPath(format!("{} names no file", c.path.display()))));
    };
    let dir = open_confined_dir(root, parent)?;
    let cn = c_name(name)?;
    // SAFETY: a valid descriptor and a NUL-terminated name; the result is checked.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            cn.as_ptr(),
            libc::O_WRONLY | libc::O_APPEND | libc::O_CREAT | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            0o600 as libc::c_uint,
        )
    };
    if fd < 0 {
        let e = io::Error::last_os_error();
        return Err(if e.raw_os_error() == Some(libc::ELOOP) {
            io::Error::other(EscapedPath(format!("{} is a symbolic link (never followed)", c.path.display())))
        } else {
            e
        });
    }
    // SAFETY: a new descriptor nothing else owns.
    append_mbox(unsafe { File::from_raw_fd(fd) }, env, data)
}
