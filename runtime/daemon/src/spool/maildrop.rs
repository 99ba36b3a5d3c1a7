//! The maildrop: where local submission (`mailc sendmail`) leaves a message for the daemon,
//! whether or not the daemon runs, as Postfix's `postdrop` does. The daemon's pickup
//! (`daemon/pickup.rs`) takes each file through the policy like any other mail.
//!
//! A file is written under a name starting with `.` (ignored by the pickup), synced, then
//! renamed to its final name, so the pickup never sees half a file. Its format (version 1):
//!
//! ```text
//! MAILDROP 1
//! F sender@example.com        (only with `sendmail -f`; `F ` alone is the null sender)
//! R rcpt@example.org          (one line per recipient)
//! U user                      (only in a file the daemon itself rewrote: see below)
//!                             (an empty line)
//! the message, as submitted
//! ```
//!
//! The submitting user is the file's owner, which the operating system records: a file
//! cannot name another user. The one exception is a file the pickup rewrites with the
//! recipients the policy deferred: the daemon owns that file, so it records the submitter
//! in a `U` line, which the pickup believes only in a file owned by the daemon's own user
//! (or root); a `U` line in anyone else's file makes it corrupt.
//!
//! The directory has mode 3733 (`daemon/privileges.rs`): anyone may add a file, nobody may
//! list it, files get the directory's group (the daemon's), and are written with mode 0640.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// The maildrop directory's name under the spool.
pub const DIR: &str = "maildrop";

/// One submission.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Submission {
    /// `None`: the daemon uses `user@hostname`; `Some("")`: the null sender.
    pub sender: Option<String>,
    pub recipients: Vec<String>,
    pub message: Vec<u8>,
    /// The submitter recorded by the daemon in a file it rewrote (`U`); never set by
    /// `mailc sendmail`.
    pub user: Option<String>,
}

fn clean(field: &str, v: &str) -> io::Result<()> {
    if v.bytes().any(|b| b == b'\n' || b == b'\r' || b == 0) {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{field} contains a line break")));
    }
    Ok(())
}

/// The file's bytes.
pub fn encode(s: &Submission) -> io::Result<Vec<u8>> {
    let mut out = b"MAILDROP 1\n".to_vec();
    if let Some(f) = &s.sender {
        clean("the sender", f)?;
        out.extend_from_slice(format!("F {f}\n").as_bytes());
    }
    for r in &s.recipients {
        clean("a recipient", r)?;
        out.extend_from_slice(format!("R {r}\n").as_bytes());
    }
    if let Some(u) = &s.user {
        clean("the user", u)?;
        out.extend_from_slice(format!("U {u}\n").as_bytes());
    }
    out.push(b'\n');
    out.extend_from_slice(&s.message);
    Ok(out)
}

/// Parses [`encode`]'s output; an error names what is wrong.
pub fn decode(bytes: &[u8]) -> Result<Submission, String> {
    let mut rest = bytes;
    let line = |rest: &mut &[u8]| -> Option<String> {
        let n = rest.iter().position(|b| *b == b'\n')?;
        let l = String::from_utf8_lossy(rest.get(..n)?).into_owned();
        *rest = rest.get(n + 1..).unwrap_or_default();
        Some(l)
    };
    if line(&mut rest).as_deref() != Some("MAILDROP 1") {
        return Err("not a maildrop file of version 1".into());
    }
    let mut s = Submission::default();
    loop {
        let Some(l) = line(&mut rest) else { return Err("the envelope does not end".into()) };
        if l.is_empty() {
            break;
        }
        match l.split_once(' ') {
            Some(("F", v)) => s.sender = Some(v.to_string()),
            Some(("R", v)) if !v.is_empty() => s.recipients.push(v.to_string()),
            Some(("U", v)) if !v.is_empty() => s.user = Some(v.to_string()),
            _ => return Err(format!("bad envelope line {l:?}")),
        }
    }
    if s.recipients.is_empty() {
        return Err("no recipients".into());
    }
    s.message = rest.to_vec();
    Ok(s)
}

/// Writes `s` into the maildrop `dir` (made when missing, mode 3733: anyone may drop a
/// file, nobody may list the others, the file gets the directory's group), durably:
/// the file is synced before it is renamed into place, and the directory after. Returns the
/// file's path.
pub fn write(dir: &Path, s: &Submission) -> io::Result<PathBuf> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    if !dir.is_dir() {
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o3733))?;
    }
    let bytes = encode(s)?;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let name = format!("{}.{:09}.{}", now.as_secs(), now.subsec_nanos(), std::process::id());
    let tmp = dir.join(format!(".{name}"));
    let fin = dir.join(&name);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o640)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)?;
    // Whatever the submitter's umask: the daemon reads it through the group bits.
    let written = f
        .set_permissions(std::fs::Permissions::from_mode(0o640))
        .and_then(|_| f.write_all(&bytes))
        .and_then(|_| f.sync_all());
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, &fin)?;
    match std::fs::File::open(dir) {
        Ok(d) => d.sync_all()?,
        // A user who may write into the maildrop but not read it (mode 3733) cannot open
        // it: the file is synced once more after the rename, which on a journaling file
        // system (ext4, XFS) commits the rename with it.
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => f.sync_all()?,
        Err(e) => return Err(e),
    }
    Ok(fin)
}

/// The operating system's name for `uid`, and the full name of its GECOS field (`uid1234`
/// and none for a uid without an entry).
pub fn user_of(uid: u32) -> (String, Option<String>) {
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: `passwd` is plain old data; getpwuid_r fills it.
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut out: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: getpwuid_r writes into `pw` and `buf`, both owned here, with `buf`'s true length.
    let rc = unsafe { libc::getpwuid_r(uid, &mut pw, buf.as_mut_ptr(), buf.len(), &mut out) };
    if rc != 0 || out.is_null() || pw.pw_name.is_null() {
        return (format!("uid{uid}"), None);
    }
    // SAFETY: the strings point into `buf`, NUL-terminated by getpwuid_r, and `buf` lives.
    let name = unsafe { std::ffi::CStr::from_ptr(pw.pw_name) }.to_string_lossy().into_owned();
    let gecos = (!pw.pw_gecos.is_null())
        .then(|| unsafe { std::ffi::CStr::from_ptr(pw.pw_gecos) }.to_string_lossy().into_owned())
        .and_then(|g| g.split(',').next().map(str::trim).filter(|g| !g.is_empty()).map(str::to_string));
    (name, gecos)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let s = Submission {
            sender: Some(String::new()),
            recipients: vec!["a@example.com".into(), "b@example.org".into()],
            message: b"Subject: x\n\nbody\nF not-an-envelope line\n".to_vec(),
            user: None,
        };
        let u = Submission { user: Some("alice".into()), ..s.clone() };
        assert_eq!(decode(&encode(&u).unwrap()), Ok(u));
        assert_eq!(decode(&encode(&s).unwrap()), Ok(s.clone()));
        let t = Submission { sender: None, ..s.clone() };
        assert_eq!(decode(&encode(&t).unwrap()), Ok(t));
        assert!(encode(&Submission { recipients: vec!["a@b\nR evil@x".into()], ..s.clone() }).is_err());
        assert!(decode(b"MAILDROP 2\nR a@b\n\nx").is_err());
        assert!(decode(b"MAILDROP 1\n\nx").is_err(), "no recipients");
        assert!(decode(b"MAILDROP 1\nR a@b\n").is_err(), "no end of envelope");
        assert!(decode(b"MAILDROP 1\nX a@b\n\n").is_err());
        let dir = std::env::temp_dir().join(format!("maildrop-test-{}", std::process::id()));
        let p = write(&dir, &s).unwrap();
        assert_eq!(decode(&std::fs::read(&p).unwrap()), Ok(s));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&dir).unwrap().permissions().mode() & 0o7777, 0o3733);
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(user_of(0).0, "root");
        assert_eq!(user_of(4_000_000_000).0, "uid4000000000");
    }
}
