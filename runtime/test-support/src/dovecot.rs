//! Dovecot LMTP (Debian packages dovecot-core and dovecot-lmtpd) on loopback.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::{is_root, listening, need, terminate, wait_for, TempDir};

const DOVECOT: &str = "/usr/sbin/dovecot";

/// A throwaway Dovecot LMTP server, on TCP 127.0.0.1:`port` and the unix socket `socket`,
/// with one known user, `u1@d.test`, whose Maildir is `mail`. Stopped on drop.
pub struct Dovecot {
    pub port: u16,
    pub socket: PathBuf,
    /// The Maildir of `u1@d.test` (its `new/` holds what was delivered).
    pub mail: PathBuf,
    pub log: PathBuf,
    child: Child,
    _dir: TempDir,
}

impl Dovecot {
    /// Starts Dovecot and returns once it listens on both.
    pub fn start() -> Dovecot {
        need(DOVECOT, "dovecot-core");
        need("/usr/lib/dovecot/lmtp", "dovecot-lmtpd");
        let dir = TempDir::new("dovecot");
        let d = dir.0.display().to_string();
        // Dovecot refuses to run its internal processes as root
        let (user, uid, gid) = if is_root() {
            ("nobody".to_string(), 65534, 65534)
        } else {
            let id = |flag: &str| {
                let out = Command::new("id").arg(flag).output().expect("run id");
                String::from_utf8_lossy(&out.stdout).trim().to_string()
            };
            (id("-un"), id("-u").parse().expect("uid"), id("-g").parse().expect("gid"))
        };
        for sub in ["run", "state", "mail"] {
            std::fs::create_dir_all(dir.join(sub)).expect("mkdir");
        }
        std::os::unix::fs::chown(dir.join("mail"), Some(uid), Some(gid)).expect("chown mail");
        std::fs::write(dir.join("users"), format!("u1@d.test::{uid}:{gid}::{d}/mail/u1::\n")).expect("users");
        let port = crate::free_port();
        let conf = format!(
            r#"base_dir = {d}/run
state_dir = {d}/state
log_path = {d}/dovecot.log
protocols = lmtp
ssl = no
listen = 127.0.0.1
default_login_user = {user}
default_internal_user = {user}
mail_location = maildir:~/Maildir
passdb {{
  driver = passwd-file
  args = {d}/users
}}
userdb {{
  driver = passwd-file
  args = {d}/users
}}
service lmtp {{
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {port}
  }}
  unix_listener lmtp {{
    mode = 0666
  }}
}}
service anvil {{
  chroot =
}}
service stats {{
  chroot =
}}
"#
        );
        std::fs::write(dir.join("dovecot.conf"), conf).expect("write dovecot.conf");
        let child = Command::new(DOVECOT)
            .arg("-F")
            .arg("-c")
            .arg(dir.join("dovecot.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start dovecot");
        let dv = Dovecot {
            port,
            socket: dir.join("run/lmtp"),
            mail: dir.join("mail/u1/Maildir"),
            log: dir.join("dovecot.log"),
            child,
            _dir: dir,
        };
        wait_for(
            Duration::from_secs(15),
            "dovecot to listen",
            || listening(port) && dv.socket.exists(),
            || dv.log_text(),
        );
        dv
    }

    /// Dovecot's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Dovecot {
    fn drop(&mut self) {
        // SIGTERM lets the master take its children down with it
        terminate(&mut self.child);
    }
}
