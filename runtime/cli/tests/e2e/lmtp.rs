//! Dovecot LMTP as the next hop.

use super::*;

// ================================================================== 3. Dovecot LMTP

/// A throwaway Dovecot LMTP server on loopback with one user, `u1@d.test`.
struct Dovecot {
    child: Guard,
    port: u16,
    mail: PathBuf,
    log: PathBuf,
}

impl Drop for Dovecot {
    fn drop(&mut self) {
        // SIGTERM lets the master take its children down with it
        let pid = self.child.pid();
        if pid != 0 {
            let _ = Command::new("kill").arg("-TERM").arg(pid.to_string()).status();
            for _ in 0..100 {
                if matches!(self.child.0.as_mut().map(|c| c.try_wait()), Some(Ok(Some(_)))) {
                    self.child.0 = None;
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.child.kill();
    }
}

fn dovecot(dir: &Path) -> Dovecot {
    need(DOVECOT, "dovecot-core");
    need("/usr/lib/dovecot/lmtp", "dovecot-lmtpd");
    let d = dir.display().to_string();
    let uid_gid = |flag: &str| -> u32 {
        let out = Command::new("id").arg(flag).output().expect("id");
        String::from_utf8_lossy(&out.stdout).trim().parse().expect("id output")
    };
    // Dovecot refuses to run its internal processes as root
    let (user, uid, gid) = if is_root() {
        ("nobody".to_string(), 65534, 65534)
    } else {
        let out = Command::new("id").arg("-un").output().expect("id");
        (String::from_utf8_lossy(&out.stdout).trim().to_string(), uid_gid("-u"), uid_gid("-g"))
    };
    for sub in ["run", "state", "mail"] {
        std::fs::create_dir_all(dir.join(sub)).expect("mkdir");
    }
    std::os::unix::fs::chown(dir.join("mail"), Some(uid), Some(gid)).expect("chown mail");
    std::fs::write(dir.join("users"), format!("u1@d.test::{uid}:{gid}::{d}/mail/u1::\n")).expect("users");
    let port = free_port();
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
}}
service anvil {{
  chroot =
}}
service stats {{
  chroot =
}}
"#
    );
    std::fs::write(dir.join("dovecot.conf"), conf).expect("dovecot.conf");
    let child = Command::new(DOVECOT)
        .arg("-F")
        .arg("-c")
        .arg(dir.join("dovecot.conf"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start dovecot");
    let dv =
        Dovecot { child: Guard(Some(child)), port, mail: dir.join("mail/u1/Maildir"), log: dir.join("dovecot.log") };
    wait_for(
        Duration::from_secs(15),
        "dovecot to listen",
        || listening(port),
        || std::fs::read_to_string(&dv.log).unwrap_or_default(),
    );
    dv
}

#[test]
fn lmtp_to_dovecot() {
    let t = TempDir::new("lmtp");
    std::fs::create_dir_all(t.join("dovecot")).expect("mkdir");
    let dv = dovecot(&t.join("dovecot"));
    let port = free_port();
    let policy = base_policy(port, free_port(), "none").replace(
        "  if recipient.domain in local {",
        &format!("  if recipient.domain :is \"d.test\" {{\n    deliver lmtp \"[127.0.0.1]:{}\";\n  }}\n  if recipient.domain in local {{", dv.port),
    );
    let d = Daemon::start(t.path(), &policy, &[port]);
    let out = swaks(
        port,
        &[
            "--from",
            "a@s.test",
            "--to",
            "u1@d.test,nosuchuser@d.test",
            "--header",
            "Subject: lmtp-e2e",
            "--body",
            "line one\n.dot line\n",
        ],
    );
    assert!(out.contains("Queued as"), "{out}");
    wait_for(
        Duration::from_secs(30),
        "the message in Dovecot's Maildir",
        || maildir(&dv.mail).iter().any(|m| m.contains("Subject: lmtp-e2e")),
        || format!("{}\n{}", d.log(), std::fs::read_to_string(&dv.log).unwrap_or_default()),
    );
    let m = maildir(&dv.mail).into_iter().find(|m| m.contains("lmtp-e2e")).unwrap_or_default();
    assert!(m.contains("Return-Path: <a@s.test>"), "{m}");
    assert!(m.contains("\n.dot line"), "dot-stuffing undone end to end: {m}");
    assert!(m.contains("by mx.test (mailpolicy)"), "{m}");
    // the unknown user is refused by Dovecot per recipient: a DSN to the sender
    wait_for(
        Duration::from_secs(30),
        "a DSN for nosuchuser@d.test",
        || maildir(&t.join("mail/a")).iter().any(|m| m.contains("nosuchuser@d.test") && m.contains("multipart/report")),
        || d.log(),
    );
    assert_eq!(maildir(&dv.mail).len(), 1, "delivered once");
}
