//! Running as an unprivileged account (`server { user ...; group ...; }`), as Postfix's
//! `mail_owner`: the daemon is started as root, binds its listeners (port 25), prepares the
//! spool's ownership, then drops to the account for good (`setgroups`, `setgid`, `setuid`,
//! each checked, then checked again: real, effective and saved ids are the account's and
//! `setuid(0)` fails). Started as root without a `user`, it refuses to run; `user "root"`
//! (or `mailc serve --user root`) is the explicit choice to run as root, logged as a warning.
//!
//! The maildrop (`spool/maildrop.rs`) is written by `mailc sendmail` run by any user, as
//! Postfix's is by `postdrop`. Instead of a setgid helper it is a directory of mode 3733
//! owned by the daemon's user and group: anyone may create a file in it (write and search
//! for all), nobody but its owner may list it (no read bit), a file may only be removed by
//! its owner or the directory's (sticky bit), and every file created in it gets the
//! directory's group (setgid bit), so the daemon reads it through the group bits of the
//! file's mode 0640 while other users cannot.

use std::ffi::CString;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

/// The account the daemon runs as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Account {
    pub user: String,
    pub uid: u32,
    pub group: String,
    pub gid: u32,
}

/// What to do about privileges, decided before anything is opened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Not root, no `user` (or `user` is who we already are): run as we are.
    Stay,
    /// Root, and `user "root"` was asked for explicitly.
    StayRoot,
    /// Root: drop to this account once the listeners are bound.
    Drop(Account),
}

/// Decides from the settings (`user`, `group`) and who the process is.
pub fn plan(user: Option<&str>, group: Option<&str>) -> Result<Plan, String> {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    match user {
        None if euid == 0 => {
            Err("refusing to run as root without an account to drop to: set `server { user \"mailpolicy\"; }` \
             (the daemon binds its listeners as root, then runs as that user), start it as that user, or \
             give `--user root` to run as root on purpose"
                .into())
        }
        None => Ok(Plan::Stay),
        Some("root") if euid == 0 => Ok(Plan::StayRoot),
        Some(u) => {
            let a = account(u, group)?;
            if euid == 0 {
                if a.uid == 0 {
                    return Ok(Plan::StayRoot);
                }
                Ok(Plan::Drop(a))
            } else if a.uid == euid {
                Ok(Plan::Stay)
            } else {
                Err(format!("cannot run as user {u} (uid {}): started as uid {euid}, not root", a.uid))
            }
        }
    }
}

/// Looks `user` (and `group`, default the user's primary group) up in the system's databases.
pub fn account(user: &str, group: Option<&str>) -> Result<Account, String> {
    let c = CString::new(user).map_err(|_| format!("user {user:?}: not a name"))?;
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: `passwd` is plain old data that getpwnam_r fills.
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut out: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is to memory owned here, `buf` with its true length.
    let rc = unsafe { libc::getpwnam_r(c.as_ptr(), &mut pw, buf.as_mut_ptr(), buf.len(), &mut out) };
    if rc != 0 || out.is_null() {
        return Err(format!("user {user:?} does not exist (useradd --system {user}, or install the package)"));
    }
    let (uid, primary) = (pw.pw_uid, pw.pw_gid);
    let (gname, gid) = match group {
        None => (group_name(primary).unwrap_or_else(|| primary.to_string()), primary),
        Some(g) => (g.to_string(), group_id(g)?),
    };
    Ok(Account { user: user.to_string(), uid, group: gname, gid })
}

fn group_id(name: &str) -> Result<u32, String> {
    let c = CString::new(name).map_err(|_| format!("group {name:?}: not a name"))?;
    let mut buf = vec![0 as libc::c_char; 64 * 1024];
    // SAFETY: as in `account`.
    let mut gr: libc::group = unsafe { std::mem::zeroed() };
    let mut out: *mut libc::group = std::ptr::null_mut();
    // SAFETY: as in `account`.
    let rc = unsafe { libc::getgrnam_r(c.as_ptr(), &mut gr, buf.as_mut_ptr(), buf.len(), &mut out) };
    if rc != 0 || out.is_null() {
        return Err(format!("group {name:?} does not exist"));
    }
    Ok(gr.gr_gid)
}

fn group_name(gid: u32) -> Option<String> {
    let mut buf = vec![0 as libc::c_char; 64 * 1024];
    // SAFETY: as in `account`.
    let mut gr: libc::group = unsafe { std::mem::zeroed() };
    let mut out: *mut libc::group = std::ptr::null_mut();
    // SAFETY: as in `account`.
    let rc = unsafe { libc::getgrgid_r(gid, &mut gr, buf.as_mut_ptr(), buf.len(), &mut out) };
    if rc != 0 || out.is_null() || gr.gr_name.is_null() {
        return None;
    }
    // SAFETY: NUL-terminated by getgrgid_r, inside `buf`, which lives.
    Some(unsafe { std::ffi::CStr::from_ptr(gr.gr_name) }.to_string_lossy().into_owned())
}

/// Gives the spool to `a` (run as root, before dropping): every directory and file under it
/// that `a` does not own is changed to `a`'s user and group (symbolic links are not
/// followed; `lchown`), and the maildrop gets its mode 3733 (see the module's text).
pub fn own_spool(dir: &Path, a: &Account) -> Result<(), String> {
    let err = |p: &Path, e: std::io::Error| format!("spool {}: {e}", p.display());
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let meta = std::fs::symlink_metadata(&d).map_err(|e| err(&d, e))?;
        chown_if(&d, &meta, a).map_err(|e| err(&d, e))?;
        if !meta.is_dir() {
            continue;
        }
        for e in std::fs::read_dir(&d).map_err(|e| err(&d, e))?.flatten() {
            let p = e.path();
            // Files in the maildrop stay their submitters' (the owner is the submitting user):
            // only their group becomes the daemon's, readable by it (files left there before
            // the directory had its setgid bit).
            if d.file_name().is_some_and(|n| n == crate::spool::maildrop::DIR) && d.parent() == Some(dir) {
                if let Ok(m) = std::fs::symlink_metadata(&p) {
                    if m.is_file() && m.gid() != a.gid {
                        std::os::unix::fs::lchown(&p, None, Some(a.gid)).map_err(|e| err(&p, e))?;
                        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).map_err(|e| err(&p, e))?;
                    }
                }
                continue;
            }
            match std::fs::symlink_metadata(&p) {
                Ok(m) if m.is_dir() => stack.push(p),
                Ok(m) if !m.file_type().is_symlink() => chown_if(&p, &m, a).map_err(|e| err(&p, e))?,
                _ => {}
            }
        }
    }
    // The queue's directories are the account's alone; the spool itself stays searchable
    // by all (the maildrop is in it).
    for q in mailpolicy_engine::record::QueueName::ALL.iter().map(|q| q.as_str()).chain(["state", "tmp", "private"]) {
        let p = dir.join(q);
        if let Ok(m) = std::fs::symlink_metadata(&p) {
            if m.is_dir() && m.permissions().mode() & 0o077 != 0 {
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o700)).map_err(|e| err(&p, e))?;
            }
        }
    }
    let top = std::fs::metadata(dir).map_err(|e| err(dir, e))?;
    if top.permissions().mode() & 0o001 == 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).map_err(|e| err(dir, e))?;
    }
    maildrop_dir(&dir.join(crate::spool::maildrop::DIR), Some(a)).map_err(|e| err(dir, e))
}

fn chown_if(p: &Path, m: &std::fs::Metadata, a: &Account) -> std::io::Result<()> {
    if m.uid() == a.uid && m.gid() == a.gid {
        return Ok(());
    }
    std::os::unix::fs::lchown(p, Some(a.uid), Some(a.gid))
}

/// The maildrop directory, made when missing, with mode 3733 and (as root) the account's
/// ownership.
pub fn maildrop_dir(dir: &Path, a: Option<&Account>) -> std::io::Result<()> {
    if !dir.is_dir() {
        std::fs::create_dir_all(dir)?;
    }
    if let Some(a) = a {
        let m = std::fs::symlink_metadata(dir)?;
        chown_if(dir, &m, a)?;
    }
    let m = std::fs::symlink_metadata(dir)?;
    if m.permissions().mode() & 0o7777 != 0o3733 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o3733))?;
    }
    Ok(())
}

/// Drops to `a` for good: supplementary groups to the one group, then the group, then the
/// user (in that order: after setuid the others are no longer allowed); each call checked,
/// then the result checked (`getresuid`/`getresgid`, and `setuid(0)` must fail).
pub fn drop_to(a: &Account) -> Result<(), String> {
    let last = |what: &str| format!("{what}: {}", std::io::Error::last_os_error());
    let groups = [a.gid as libc::gid_t];
    // SAFETY: one gid from a live array.
    if unsafe { libc::setgroups(1, groups.as_ptr()) } != 0 {
        return Err(last("setgroups"));
    }
    // SAFETY: plain system calls on integers.
    if unsafe { libc::setresgid(a.gid, a.gid, a.gid) } != 0 {
        return Err(last("setresgid"));
    }
    // SAFETY: as above.
    if unsafe { libc::setresuid(a.uid, a.uid, a.uid) } != 0 {
        return Err(last("setresuid"));
    }
    let (mut r, mut e, mut s) = (0, 0, 0);
    // SAFETY: three out-parameters owned here.
    let ok_u = unsafe { libc::getresuid(&mut r, &mut e, &mut s) } == 0 && [r, e, s] == [a.uid; 3];
    let (mut gr, mut ge, mut gs) = (0, 0, 0);
    // SAFETY: as above.
    let ok_g = unsafe { libc::getresgid(&mut gr, &mut ge, &mut gs) } == 0 && [gr, ge, gs] == [a.gid; 3];
    // SAFETY: a plain system call; it must fail now.
    let regained = unsafe { libc::setuid(0) } == 0;
    if !ok_u || !ok_g || regained {
        return Err(format!("dropping to {}:{} did not take (uid {r}/{e}/{s}, gid {gr}/{ge}/{gs})", a.user, a.group));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accounts_are_looked_up() {
        let root = account("root", None).unwrap();
        assert_eq!((root.uid, root.gid, root.group.as_str()), (0, 0, "root"));
        assert_eq!(account("root", Some("root")).unwrap().gid, 0);
        assert!(account("no-such-user-mailpolicy-test", None).unwrap_err().contains("does not exist"));
        assert!(account("root", Some("no-such-group-mailpolicy-test")).unwrap_err().contains("does not exist"));
        assert!(account("ro\0ot", None).is_err());
    }

    #[test]
    fn root_without_a_user_is_refused() {
        // SAFETY: no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            assert!(plan(None, None).unwrap_err().contains("refusing to run as root"));
            assert_eq!(plan(Some("root"), None), Ok(Plan::StayRoot));
        } else {
            assert_eq!(plan(None, None), Ok(Plan::Stay));
            assert!(plan(Some("root"), None).unwrap_err().contains("not root"));
        }
    }
}
