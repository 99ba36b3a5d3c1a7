//! Postfix relaying to us.

use super::*;

// ================================================================== 4. Postfix relaying to us

/// A throwaway Postfix on loopback with its own configuration directory, queue and log;
/// `postfix stop` (then `abort`, then SIGKILL of the master) on drop.
struct Postfix {
    dir: PathBuf,
    port: u16,
}

impl Postfix {
    fn conf(&self) -> PathBuf {
        self.dir.join("etc")
    }
    fn master_pid(&self) -> Option<String> {
        std::fs::read_to_string(self.dir.join("spool/pid/master.pid")).ok().map(|s| s.trim().to_string())
    }
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("maillog")).unwrap_or_default()
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        let pid = self.master_pid();
        let _ = run_bounded_quiet(Command::new(POSTFIX).arg("-c").arg(self.conf()).arg("stop"));
        let alive = |p: &str| Path::new(&format!("/proc/{p}")).exists();
        if let Some(p) = pid {
            for _ in 0..100 {
                if !alive(&p) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = run_bounded_quiet(Command::new(POSTFIX).arg("-c").arg(self.conf()).arg("abort"));
            if alive(&p) {
                let _ = Command::new("kill").arg("-KILL").arg(&p).status();
            }
        }
    }
}

fn run_bounded_quiet(cmd: &mut Command) -> Option<ExitStatus> {
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().ok()?;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(20) {
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

fn postfix(dir: &Path, relay_port: u16) -> Postfix {
    need(POSTFIX, "postfix");
    assert!(is_root(), "a throwaway Postfix needs root (its master runs as root and drops to `postfix`)");
    let d = dir.display().to_string();
    for sub in ["etc", "spool", "data"] {
        std::fs::create_dir_all(dir.join(sub)).expect("mkdir");
    }
    let _ = Command::new("chown").arg("postfix").arg(dir.join("data")).status();
    let port = free_port();
    std::fs::write(
        dir.join("etc/main.cf"),
        format!(
            "compatibility_level = 3.6
queue_directory = {d}/spool
data_directory = {d}/data
mail_owner = postfix
myhostname = pf.test
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
relayhost = [127.0.0.1]:{relay_port}
smtpd_recipient_restrictions = permit_mynetworks, reject_unauth_destination
smtp_tls_security_level = may
maillog_file = {d}/maillog
maillog_file_prefixes = {tmp}
",
            tmp = std::env::temp_dir().display()
        ),
    )
    .expect("main.cf");
    let services = [
        ("pickup", "unix  n - n 60 1 pickup"),
        ("cleanup", "unix  n - n - 0 cleanup"),
        ("qmgr", "unix  n - n 300 1 qmgr"),
        ("tlsmgr", "unix  - - n 1000? 1 tlsmgr"),
        ("rewrite", "unix  - - n - - trivial-rewrite"),
        ("bounce", "unix  - - n - 0 bounce"),
        ("defer", "unix  - - n - 0 bounce"),
        ("trace", "unix  - - n - 0 bounce"),
        ("verify", "unix  - - n - 1 verify"),
        ("flush", "unix  n - n 1000? 0 flush"),
        ("proxymap", "unix  - - n - - proxymap"),
        ("smtp", "unix  - - n - - smtp"),
        ("relay", "unix  - - n - - smtp"),
        ("showq", "unix  n - n - - showq"),
        ("error", "unix  - - n - - error"),
        ("retry", "unix  - - n - - error"),
        ("discard", "unix  - - n - - discard"),
        ("local", "unix  - n n - - local"),
        ("anvil", "unix  - - n - 1 anvil"),
        ("scache", "unix  - - n - 1 scache"),
        ("postlog", "unix-dgram n - n - 1 postlogd"),
    ];
    let mut master = format!("127.0.0.1:{port} inet n - n - - smtpd\n");
    for (name, rest) in services {
        master.push_str(&format!("{name} {rest}\n"));
    }
    std::fs::write(dir.join("etc/master.cf"), master).expect("master.cf");
    let pf = Postfix { dir: dir.to_path_buf(), port };
    let (st, out, err) =
        run_bounded(Command::new(POSTFIX).arg("-c").arg(pf.conf()).arg("start"), Duration::from_secs(60));
    assert!(st.success(), "postfix start failed: {out}{err}\n{}", pf.log());
    wait_for(Duration::from_secs(20), "Postfix's smtpd to listen", || listening(port), || pf.log());
    pf
}

#[test]
fn postfix_relays_to_us() {
    need(SENDMAIL, "postfix");
    let t = TempDir::new("postfix");
    let port = free_port();
    let d = Daemon::start(t.path(), &base_policy(port, free_port(), "starttls"), &[port]);
    let pf = postfix(&t.join("pf"), port);
    // injected through Postfix's sendmail (pickup) ...
    let mut sm = Command::new(SENDMAIL)
        .arg("-C")
        .arg(pf.conf())
        .args(["-f", "a@s.test", "u1@d.test"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("sendmail");
    sm.stdin.take().expect("stdin").write_all(b"Subject: via-postfix-sendmail\n\nhello from postfix\n").expect("write");
    let st = sm.wait().expect("sendmail");
    assert!(st.success(), "sendmail failed\n{}", pf.log());
    // ... and through its smtpd
    let out = swaks(pf.port, &["--from", "a@s.test", "--to", "u2@d.test", "--header", "Subject: via-postfix-smtpd"]);
    assert!(out.contains("250 2.0.0 Ok: queued"), "{out}");
    wait_for(
        Duration::from_secs(60),
        "both messages relayed by Postfix into our Maildirs",
        || {
            maildir(&t.join("mail/u1")).iter().any(|m| m.contains("Subject: via-postfix-sendmail"))
                && maildir(&t.join("mail/u2")).iter().any(|m| m.contains("Subject: via-postfix-smtpd"))
        },
        || format!("{}\n{}", pf.log(), d.log()),
    );
    let m = maildir(&t.join("mail/u1")).join("");
    assert!(m.contains("by pf.test (Postfix"), "{m}");
    assert!(m.contains("with ESMTPS"), "Postfix used STARTTLS to us: {m}");
    assert!(m.contains("from pf.test"), "Postfix's EHLO in our Received: {m}");
    assert!(pf.log().contains(&format!("relay=127.0.0.1[127.0.0.1]:{port}")), "{}", pf.log());
    assert!(pf.log().contains("status=sent (250 2.0.0 Queued as"), "{}", pf.log());
}
