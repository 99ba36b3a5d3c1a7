//! `mailc serve` with real milters and content filters from Debian, on loopback, each
//! started by the test with a configuration of its own in a temporary directory and
//! stopped when the test ends (spec/language.md, "Milters"): OpenDKIM signing through
//! the milter protocol (the signature verified with the project's own DKIM verifier,
//! mail-auth), spamass-milter with SpamAssassin's spamd rejecting GTUBE, rspamd through
//! its HTTP API and its milter interface, and milters that are down or too slow (the
//! default action and the time-out hold), and a before-queue filter (`proxy_filter`):
//! proxsmtp running spamc against spamd, re-injecting on a second listener. A missing
//! program fails the test with the
//! advice to run `tests/run.sh`, which installs them.
//!
//! No timed assertions: every wait is bounded only so that a broken peer fails the test.

use std::net::{IpAddr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mailpolicy_test_support::{free_port, listening, wait_for, PeerIn, Serve, TempDir};

const MAILC: &str = env!("CARGO_BIN_EXE_mailc");
const SWAKS: &str = "/usr/bin/swaks";
const OPENDKIM: &str = "/usr/sbin/opendkim";
const SPAMASS_MILTER: &str = "/usr/sbin/spamass-milter";
const SPAMD: &str = "/usr/sbin/spamd";
const UNBOUND: &str = "/usr/sbin/unbound";
const RSPAMD: &str = "/usr/bin/rspamd";
const PROXSMTPD: &str = "/usr/sbin/proxsmtpd";
const SPAMC: &str = "/usr/bin/spamc";

const GTUBE: &str = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X";

fn need(path: &str, package: &str) {
    assert!(
        Path::new(path).exists(),
        "{path} not found (Debian package {package}); run tests/run.sh, which installs the test peers"
    );
}

/// A child process killed and reaped on drop.
struct Guard(Option<Child>);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn swaks(port: u16, args: &[&str]) -> String {
    need(SWAKS, "swaks");
    let out = Command::new(SWAKS)
        .args(["--server", &format!("127.0.0.1:{port}"), "--timeout", "60", "--helo", "client.test"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run swaks");
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn maildir(dir: &Path) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(dir.join("new")) else { return Vec::new() };
    rd.filter_map(|e| e.ok()).filter_map(|e| std::fs::read_to_string(e.path()).ok()).collect()
}

/// A daemon that forks workers (rspamd), started in a process group of its own: on drop
/// the whole group gets SIGTERM, then SIGKILL, so no worker outlives the test.
struct Group(Child);

impl Drop for Group {
    fn drop(&mut self) {
        let pgid = self.0.id() as i32;
        // SAFETY: kill(2) on a process group this test created.
        unsafe { libc::kill(-pgid, libc::SIGTERM) };
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // SAFETY: as above.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
        let _ = self.0.wait();
    }
}

/// `mailc serve` (test-support's one starter) running `policy` in `dir`, ready when `port`
/// listens.
fn daemon(dir: &Path, policy: &str, port: u16) -> Serve {
    Serve::start(MAILC, dir, policy, &[port])
}

/// A policy delivering d.test to Maildirs, with `extra` (scanners, rules) added.
fn policy(port: u16, extra: &str) -> String {
    format!(
        r#"list local = domains ["d.test"];
server {{
  hostname "mx.test";
  spool "spool";
  maildir "mail";
  local_domains local;
  queue_run 1s;
}}
listener smtp {{
  address "127.0.0.1:{port}";
  tls none;
}}
{extra}
route {{
  if recipient.domain in local {{
    deliver maildir;
  }}
}}
"#
    )
}

/// unbound serving `records` for the zone `test.` on a UDP/TCP port of its own.
fn unbound(dir: &Path, records: &[String]) -> (PeerIn, u16) {
    need(UNBOUND, "unbound");
    let port = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let data: String = records.iter().map(|r| format!("  local-data: '{r}'\n")).collect();
    let conf = format!(
        "server:\n  interface: 127.0.0.1@{port}\n  port: {port}\n  do-daemonize: no\n  username: \"\"\n  chroot: \"\"\n  directory: \"{d}\"\n  pidfile: \"\"\n  use-syslog: no\n  logfile: \"\"\n  do-ip6: no\n  access-control: 127.0.0.0/8 allow\n  local-zone: \"test.\" static\n{data}remote-control:\n  control-enable: no\n",
        d = dir.display()
    );
    std::fs::write(dir.join("unbound.conf"), conf).unwrap();
    let child = Command::new(UNBOUND)
        .arg("-d")
        .arg("-c")
        .arg(dir.join("unbound.conf"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start unbound");
    (PeerIn(child, dir.to_path_buf()), port)
}

/// OpenDKIM signs mail from d.test through the milter protocol; the signature it adds
/// verifies with the project's own DKIM verifier (mail-auth through the daemon crate's
/// `SenderAuth`, keys from DNS served by unbound).
#[test]
fn opendkim_signs_through_the_milter() {
    need(OPENDKIM, "opendkim");
    let t = TempDir::new("opendkim");
    let dir = t.path();
    let key = dir.join("sel.private");
    let st = Command::new("openssl").args(["genrsa", "-out"]).arg(&key).arg("2048").output().expect("openssl");
    assert!(st.status.success(), "openssl genrsa: {}", String::from_utf8_lossy(&st.stderr));
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let der = Command::new("openssl")
        .args(["rsa", "-pubout", "-outform", "DER", "-in"])
        .arg(&key)
        .output()
        .expect("openssl rsa");
    let public = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &der.stdout);
    let txt: Vec<String> = format!("v=DKIM1; k=rsa; p={public}")
        .as_bytes()
        .chunks(200)
        .map(|c| format!("\"{}\"", String::from_utf8_lossy(c)))
        .collect();
    let dns_dir = dir.join("dns");
    std::fs::create_dir_all(&dns_dir).unwrap();
    let (_dns, dns_port) = unbound(&dns_dir, &[format!("sel._domainkey.d.test. TXT {}", txt.join(" "))]);

    let mport = free_port();
    let conf = format!(
        "Syslog no\nBackground no\nMode s\nSocket inet:{mport}@127.0.0.1\nDomain d.test\nSelector sel\nKeyFile {}\nCanonicalization relaxed/simple\nInternalHosts 127.0.0.1\nRequireSafeKeys no\nPidFile {}\nUMask 007\n",
        key.display(),
        dir.join("opendkim.pid").display()
    );
    std::fs::write(dir.join("opendkim.conf"), conf).unwrap();
    let log = std::fs::File::create(dir.join("opendkim.log")).unwrap();
    let child = Command::new(OPENDKIM)
        .arg("-f")
        .arg("-x")
        .arg(dir.join("opendkim.conf"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start opendkim");
    let _milter = Guard(Some(child));
    let odlog = || std::fs::read_to_string(dir.join("opendkim.log")).unwrap_or_default();
    wait_for(Duration::from_secs(30), "opendkim listening", || listening(mport), odlog);

    let port = free_port();
    let extra = format!("scanner dkim = milter \"inet:127.0.0.1:{mport}\" {{ timeout 20s; }};\n");
    let d = daemon(dir, &policy(port, &extra), port);
    let out = swaks(
        port,
        &[
            "--from",
            "alice@d.test",
            "--to",
            "u@d.test",
            "--header",
            "Subject: signed by opendkim",
            "--body",
            "Hello.\r\nSecond line.\r\n",
        ],
    );
    assert!(out.contains("Queued as"), "{out}\n{}\n{}", d.log(), odlog());
    wait_for(Duration::from_secs(30), "the message in mail/u", || !maildir(&dir.join("mail/u")).is_empty(), || d.log());
    let msg = maildir(&dir.join("mail/u")).remove(0);
    assert!(msg.contains("DKIM-Signature:") && msg.contains("d=d.test") && msg.contains("s=sel"), "{msg}\n{}", odlog());

    // Verify with mail-auth through the daemon's own verifier.
    let p = format!("require [\"dkim\"];\nserver {{ hostname \"mx.test\"; dns_server \"127.0.0.1:{dns_port}\"; }}\n");
    let c = mailpolicy_lang::compile("p.mailpolicy", &mailpolicy_lang::MemLoader::single("p.mailpolicy", &p));
    let prog = c.program.expect("policy compiles");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let auth = mailpolicy_daemon::auth::SenderAuth::new(
            &prog,
            "mx.test",
            mailpolicy_daemon::transport::mx::policy_resolver(&prog).expect("resolver"),
        );
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let mut dkim = String::new();
        for _ in 0..50 {
            let mut st = mailpolicy_daemon::auth::AuthState::default();
            dkim = auth.content(&mut st, ip, "client.test", "alice@d.test", msg.as_bytes()).await.0;
            if dkim != "temperror" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(dkim, "pass", "opendkim's signature must verify:\n{msg}");
        // And a changed body no longer does: the check is real.
        let tampered = msg.replace("Second line.", "Second line!");
        let mut st = mailpolicy_daemon::auth::AuthState::default();
        let dkim = auth.content(&mut st, ip, "client.test", "alice@d.test", tampered.as_bytes()).await.0;
        assert_ne!(dkim, "pass");
    });
    assert!(d.log().contains("milter dkim: data"), "{}", d.log());
}

/// spamd on a port of its own, answering once its rules are loaded.
fn spamd(dir: &Path) -> (Guard, u16) {
    need(SPAMD, "spamassassin");
    let port = free_port();
    let child = Command::new(SPAMD)
        .args([&format!("--listen=127.0.0.1:{port}"), "--max-children=1", "--syslog=stderr", "-u", "nobody"])
        .arg(format!("--pidfile={}", dir.join("spamd.pid").display()))
        .stderr(std::fs::File::create(dir.join("spamd.log")).unwrap())
        .stdout(Stdio::null())
        .spawn()
        .expect("start spamd");
    let g = Guard(Some(child));
    let log = || std::fs::read_to_string(dir.join("spamd.log")).unwrap_or_default();
    wait_for(Duration::from_secs(120), "spamd listening", || listening(port), log);
    (g, port)
}

/// spamass-milter (on a unix socket) asks spamd about each message and rejects GTUBE
/// at end of message with its own reply; a clean message is delivered with the
/// X-Spam headers the milter adds.
#[test]
fn spamass_milter_rejects_gtube() {
    need(SPAMASS_MILTER, "spamass-milter");
    let t = TempDir::new("spamass");
    let dir = t.path();
    let (_spamd, sport) = spamd(dir);
    let sock = dir.join("spamass.sock");
    let child = Command::new(SPAMASS_MILTER)
        .arg("-p")
        .arg(&sock)
        .args(["-r", "15", "--", "-d", "127.0.0.1", "-p", &sport.to_string()])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("spamass.log")).unwrap())
        .spawn()
        .expect("start spamass-milter");
    let _milter = Guard(Some(child));
    let mlog = || std::fs::read_to_string(dir.join("spamass.log")).unwrap_or_default();
    wait_for(Duration::from_secs(30), "spamass-milter's socket", || sock.exists(), mlog);

    let port = free_port();
    let extra =
        format!("scanner spam = milter \"unix:{}\" {{ timeout 60s; content_timeout 120s; }};\n", sock.display());
    let d = daemon(dir, &policy(port, &extra), port);
    let out =
        swaks(port, &["--from", "eve@other.test", "--to", "u@d.test", "--header", "Subject: gtube", "--body", GTUBE]);
    assert!(
        out.contains("<** 5") && !out.contains("Queued as"),
        "GTUBE must be refused:\n{out}\n{}\n{}",
        d.log(),
        mlog()
    );
    let out = swaks(
        port,
        &[
            "--from",
            "bob@other.test",
            "--to",
            "u@d.test",
            "--header",
            "Subject: lunch",
            "--body",
            "Shall we meet at noon?",
        ],
    );
    assert!(out.contains("Queued as"), "{out}\n{}\n{}", d.log(), mlog());
    wait_for(
        Duration::from_secs(30),
        "the clean message in mail/u",
        || !maildir(&dir.join("mail/u")).is_empty(),
        || d.log(),
    );
    let msgs = maildir(&dir.join("mail/u"));
    assert_eq!(msgs.len(), 1, "only the clean message is delivered");
    assert!(msgs[0].contains("Subject: lunch") && msgs[0].contains("X-Spam-"), "{}", msgs[0]);
    assert!(d.log().contains("milter spam: data reject"), "{}", d.log());
}

/// A milter that is down (nothing listens) and one that is too slow (it accepts the
/// connection and never answers): with `default_action tempfail` the client is told to
/// come back (451 4.7.1), with `default_action accept` the mail is delivered as if the
/// milter were not there; the time-out holds, and the daemon logs why.
#[test]
fn milters_down_or_slow_take_their_default_action() {
    let t = TempDir::new("milter-down");
    let dir = t.path();
    // Slow: a listener that accepts and reads, and never replies.
    let slow = TcpListener::bind("127.0.0.1:0").unwrap();
    let slow_port = slow.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in slow.incoming().flatten() {
            held.push(s);
        }
    });
    let down_port = free_port();

    for (milter_port, action, what) in [
        (down_port, "tempfail", "down"),
        (slow_port, "tempfail", "slow"),
        (down_port, "accept", "down"),
        (slow_port, "accept", "slow"),
    ] {
        let sub = dir.join(format!("{what}-{action}"));
        std::fs::create_dir_all(&sub).unwrap();
        let port = free_port();
        let extra = format!(
            "scanner m = milter \"inet:127.0.0.1:{milter_port}\" {{ timeout 1s; connect_timeout 1s; default_action {action}; }};\n"
        );
        let d = daemon(&sub, &policy(port, &extra), port);
        let out = swaks(port, &["--from", "a@other.test", "--to", "u@d.test", "--header", &format!("Subject: {what}")]);
        if action == "tempfail" {
            assert!(out.contains("<** 451 4.7.1"), "{what} milter, tempfail:\n{out}\n{}", d.log());
            assert!(!out.contains("Queued as"), "{out}");
        } else {
            assert!(out.contains("Queued as"), "{what} milter, accept:\n{out}\n{}", d.log());
            wait_for(Duration::from_secs(30), "delivery", || maildir(&sub.join("mail/u")).len() == 1, || d.log());
        }
        let log = d.log();
        let why = if what == "down" { "connect" } else { "timed out" };
        assert!(log.contains(&format!("default action {action}")) && log.contains(why), "{what}/{action}:\n{log}");
    }
}

/// Debian's rspamd on loopback with a configuration of its own (`--var` points its
/// local and override directories, database, run and log directories at `dir`; no
/// redis: the modules that need it stay off), its DNS an unbound that answers every name
/// NXDOMAIN (no network). Returns once the normal worker scans.
fn rspamd(dir: &Path) -> (PeerIn, Group, u16, u16) {
    need(RSPAMD, "rspamd");
    let dns_dir = dir.join("dns");
    std::fs::create_dir_all(&dns_dir).unwrap();
    need(UNBOUND, "unbound");
    let dns_port = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let conf = format!(
        "server:\n  interface: 127.0.0.1@{dns_port}\n  port: {dns_port}\n  do-daemonize: no\n  username: \"\"\n  chroot: \"\"\n  directory: \"{d}\"\n  pidfile: \"\"\n  use-syslog: no\n  logfile: \"\"\n  do-ip6: no\n  access-control: 127.0.0.0/8 allow\n  local-zone: \".\" static\nremote-control:\n  control-enable: no\n",
        d = dns_dir.display()
    );
    std::fs::write(dns_dir.join("unbound.conf"), conf).unwrap();
    let dns = Command::new(UNBOUND)
        .arg("-d")
        .arg("-c")
        .arg(dns_dir.join("unbound.conf"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start unbound");
    let conf_dir = dir.join("rspamd");
    for sub in ["override.d", "local.d", "db", "run", "log"] {
        std::fs::create_dir_all(conf_dir.join(sub)).unwrap();
    }
    let (normal, controller, proxy) = (free_port(), free_port(), free_port());
    let w = |f: &str, s: String| std::fs::write(conf_dir.join(f), s).unwrap();
    w("override.d/worker-normal.inc", format!("bind_socket = \"127.0.0.1:{normal}\";\n"));
    w("override.d/worker-controller.inc", format!("bind_socket = \"127.0.0.1:{controller}\";\n"));
    w(
        "override.d/worker-proxy.inc",
        format!(
            "bind_socket = \"127.0.0.1:{proxy}\";\nmilter = yes;\ntimeout = 120s;\nupstream \"local\" {{\n  default = yes;\n  hosts = \"127.0.0.1:{normal}\";\n}}\n"
        ),
    );
    w(
        "local.d/options.inc",
        format!("dns {{ nameserver = [\"127.0.0.1:{dns_port}\"]; timeout = 1s; retransmits = 1; }}\n"),
    );
    w("override.d/logging.inc", "type = \"file\";\nlevel = \"info\";\n".into());
    let var = |k: &str, sub: &str| format!("--var={k}={}", conf_dir.join(sub).display());
    let child = Command::new(RSPAMD)
        .process_group(0)
        .args(["-f", "-i", "-c", "/etc/rspamd/rspamd.conf"])
        .arg(format!("--var=LOCAL_CONFDIR={}", conf_dir.display()))
        .args([var("DBDIR", "db"), var("RUNDIR", "run"), var("LOGDIR", "log")])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("rspamd.out")).unwrap())
        .spawn()
        .expect("start rspamd");
    let (dns, rspamd) = (PeerIn(dns, dns_dir), Group(child));
    let log = || std::fs::read_to_string(conf_dir.join("log/rspamd.log")).unwrap_or_default();
    // It compiles its regular expressions before its workers listen (some seconds).
    wait_for(Duration::from_secs(180), "rspamd's workers", || listening(normal) && listening(proxy), log);
    (dns, rspamd, normal, proxy)
}

/// rspamd for real: GTUBE and a clean message through the HTTP scanner client
/// (`score`), then through its proxy worker's milter interface.
#[test]
fn rspamd_http_and_milter() {
    let t = TempDir::new("rspamd");
    let dir = t.path();
    let (_dns, _rspamd, normal, proxy) = rspamd(dir);
    let rlog = || std::fs::read_to_string(dir.join("rspamd/log/rspamd.log")).unwrap_or_default();

    // The existing HTTP client, called directly: GTUBE scores the reject threshold.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let facts = mailpolicy_engine::eval::Facts::default();
    let url = format!("http://127.0.0.1:{normal}/checkv2");
    let gtube = format!("From: a@example.net\r\nTo: u@d.test\r\nSubject: test\r\n\r\n{GTUBE}\r\n");
    let ham = "From: Alice <a@example.net>\r\nTo: u@d.test\r\nSubject: lunch\r\nDate: Tue, 1 Dec 2026 10:00:00 +0000\r\nMessage-ID: <l1@example.net>\r\n\r\nShall we meet at noon?\r\n";
    let (spam_score, ham_score) = rt.block_on(async {
        let mut s = Err(String::new());
        for _ in 0..100 {
            s = mailpolicy_daemon::scan::rspamd(&url, gtube.as_bytes(), &facts).await;
            if s.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        (s, mailpolicy_daemon::scan::rspamd(&url, ham.as_bytes(), &facts).await)
    });
    let spam_score = spam_score.expect("rspamd scans GTUBE");
    let ham_score = ham_score.expect("rspamd scans a clean message");
    assert!(spam_score >= 15.0 && ham_score < 5.0, "GTUBE {spam_score}, clean {ham_score}\n{}", rlog());

    // Through the daemon: `score` over HTTP.
    let sub = dir.join("http");
    std::fs::create_dir_all(&sub).unwrap();
    let port = free_port();
    let extra = format!(
        "require [\"spamscan\"];\nscanner rs = rspamd \"{url}\";\non data {{\n  if score rs >= 15 {{\n    reject 550 5.7.1 \"Spam\";\n  }}\n}}\n"
    );
    let d = daemon(&sub, &policy(port, &extra), port);
    let out =
        swaks(port, &["--from", "a@example.net", "--to", "u@d.test", "--header", "Subject: test", "--body", GTUBE]);
    assert!(out.contains("<** 550 5.7.1 Spam"), "{out}\n{}", d.log());
    let out = swaks(
        port,
        &[
            "--from",
            "a@example.net",
            "--to",
            "u@d.test",
            "--header",
            "Subject: lunch",
            "--body",
            "Shall we meet at noon?",
        ],
    );
    assert!(out.contains("Queued as"), "{out}\n{}", d.log());
    wait_for(Duration::from_secs(30), "delivery", || maildir(&sub.join("mail/u")).len() == 1, || d.log());
    drop(d);

    // Through the milter interface of the proxy worker.
    let sub = dir.join("milter");
    std::fs::create_dir_all(&sub).unwrap();
    let port = free_port();
    let extra = format!("scanner rsm = milter \"inet:127.0.0.1:{proxy}\" {{ timeout 60s; }};\n");
    let d = daemon(&sub, &policy(port, &extra), port);
    let out =
        swaks(port, &["--from", "a@example.net", "--to", "u@d.test", "--header", "Subject: test", "--body", GTUBE]);
    assert!(out.contains("<** 5") && !out.contains("Queued as"), "{out}\n{}\n{}", d.log(), rlog());
    let out = swaks(
        port,
        &[
            "--from",
            "a@example.net",
            "--to",
            "u@d.test",
            "--header",
            "Subject: lunch",
            "--body",
            "Shall we meet at noon?",
        ],
    );
    assert!(out.contains("Queued as"), "{out}\n{}\n{}", d.log(), rlog());
    wait_for(Duration::from_secs(30), "delivery", || maildir(&sub.join("mail/u")).len() == 1, || d.log());
    assert!(d.log().contains("milter rsm: data reject"), "{}", d.log());
    // The milter's `i` macro is the queue id the message was stored under: rspamd logs it.
    let qid = out.split("Queued as ").nth(1).and_then(|r| r.split_whitespace().next()).unwrap_or_default();
    assert!(!qid.is_empty(), "{out}");
    wait_for(Duration::from_secs(30), "rspamd's log line with the queue id", || rlog().contains(qid), rlog);
}

/// Messages still in a spool (not its TLS key pair).
fn queued(spool: &Path) -> usize {
    let mut n = 0;
    let mut stack = vec![spool.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            let rel = p.strip_prefix(spool).unwrap_or(&p).to_string_lossy().to_string();
            if rel.starts_with("tls")
                || rel.starts_with("corrupt")
                || rel.starts_with("tmp")
                || rel.starts_with("private")
                || rel.starts_with("public")
            {
                continue;
            }
            if p.is_dir() {
                stack.push(p);
            } else {
                n += 1;
            }
        }
    }
    n
}

/// The after-queue content filter loop (R24, R44) end to end: mail arriving on the
/// `smtp` listener is queued and handed to the filter (`filter smtp`), a second
/// `mailc serve` acting as the filter (it adds a header and relays everything back),
/// which re-injects it on the `reinject` listener, where it is not filtered again; the
/// message is delivered once, with the filter's mark, and both queues empty.
#[test]
fn after_queue_filter_loop_delivers_once() {
    let t = TempDir::new("filter-loop");
    let (main_dir, filter_dir) = (t.path().join("mta"), t.path().join("filter"));
    std::fs::create_dir_all(&main_dir).unwrap();
    std::fs::create_dir_all(&filter_dir).unwrap();
    let (port, reinject, fport) = (free_port(), free_port(), free_port());
    let main_policy = format!(
        r#"list local = domains ["d.test"];
server {{
  hostname "mx.test";
  spool "spool";
  maildir "mail";
  local_domains local;
  queue_run 1s;
  retry_min 1s;
  retry_max 2s;
}}
listener smtp {{
  address "127.0.0.1:{port}";
  tls none;
}}
listener reinject {{
  address "127.0.0.1:{reinject}";
  tls none;
}}
on data {{
  if listener :is "smtp" {{
    filter smtp "[127.0.0.1]:{fport}";
  }}
}}
route {{
  if recipient.domain in local {{
    deliver maildir;
  }}
}}
"#
    );
    let filter_policy = format!(
        r#"server {{
  hostname "filter.test";
  spool "spool";
  queue_run 1s;
  retry_min 1s;
  retry_max 2s;
}}
listener smtp {{
  address "127.0.0.1:{fport}";
  tls none;
}}
on data {{
  header add "X-Filtered" "by the content filter";
}}
route {{
  deliver smtp "[127.0.0.1]:{reinject}";
}}
"#
    );
    let f = daemon(&filter_dir, &filter_policy, fport);
    let d = daemon(&main_dir, &main_policy, port);
    let out = swaks(port, &["--from", "a@other.test", "--to", "u@d.test", "--header", "Subject: through the filter"]);
    assert!(out.contains("Queued as"), "{out}\n{}", d.log());
    let ctx = || format!("mta:\n{}\nfilter:\n{}", d.log(), f.log());
    wait_for(Duration::from_secs(60), "delivery", || !maildir(&main_dir.join("mail/u")).is_empty(), ctx);
    wait_for(
        Duration::from_secs(60),
        "both queues empty",
        || queued(&main_dir.join("spool")) == 0 && queued(&filter_dir.join("spool")) == 0,
        ctx,
    );
    // Nothing more arrives: a loop would bring the message round again within a queue run.
    std::thread::sleep(Duration::from_secs(3));
    let msgs = maildir(&main_dir.join("mail/u"));
    assert_eq!(msgs.len(), 1, "delivered exactly once:\n{msgs:?}\n{}", ctx());
    assert!(
        msgs[0].contains("X-Filtered: by the content filter") && msgs[0].contains("Subject: through the filter"),
        "{}",
        msgs[0]
    );
    assert_eq!(msgs[0].matches("X-Filtered:").count(), 1, "filtered once: {}", msgs[0]);
}

/// The before-queue filter (R44, `proxy_filter`) against a real SMTP proxy: proxsmtpd
/// pipes each message through spamc (SpamAssassin's client, to spamd; `-E`: a spam exit
/// code makes proxsmtpd refuse the message) and relays what passes to the `reinject`
/// listener, which has no filter and queues. The client gets the filter's reply to end
/// of data: a clean message is queued once by the re-injection listener (the reply
/// carries its queue id) and delivered with the filter's and SpamAssassin's headers;
/// GTUBE gets proxsmtpd's 550 and nothing is queued; a filter that does not answer
/// (`proxy_filter_timeout`) and one that is down give 451 4.3.0, and nothing is queued.
#[test]
fn proxsmtp_before_queue_filter_with_spamd() {
    need(PROXSMTPD, "proxsmtp");
    need(SPAMC, "spamc");
    let t = TempDir::new("proxsmtp");
    let dir = t.path();
    let (_spamd, sport) = spamd(dir);
    let (port, fport, reinject, slow_port) = (free_port(), free_port(), free_port(), free_port());
    let conf = dir.join("proxsmtpd.conf");
    std::fs::write(
        &conf,
        format!(
            "FilterCommand: {SPAMC} -d 127.0.0.1 -p {sport} -E\nFilterType: pipe\nFilterTimeout: 60\n\
             Listen: 127.0.0.1:{fport}\nOutAddress: 127.0.0.1:{reinject}\nTempDirectory: {}\n\
             Header: X-Filtered: by proxsmtp\n",
            dir.display()
        ),
    )
    .unwrap();
    let child = Command::new(PROXSMTPD)
        .args(["-d", "3", "-f"])
        .arg(&conf)
        .arg("-p")
        .arg(dir.join("proxsmtpd.pid"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("proxsmtpd.log")).unwrap())
        .spawn()
        .expect("start proxsmtpd");
    let mut filter = Guard(Some(child));
    let flog = || std::fs::read_to_string(dir.join("proxsmtpd.log")).unwrap_or_default();
    wait_for(Duration::from_secs(30), "proxsmtpd listening", || listening(fport), flog);
    // A filter that accepts connections and never says a word.
    let slow = TcpListener::bind(("127.0.0.1", slow_port)).unwrap();
    let slow_listener = free_port();
    let policy = format!(
        r#"list local = domains ["d.test"];
server {{
  hostname "mx.test";
  spool "spool";
  maildir "mail";
  local_domains local;
  queue_run 1s;
}}
listener smtp {{
  address "127.0.0.1:{port}";
  tls none;
  proxy_filter "127.0.0.1:{fport}";
  proxy_filter_timeout 60s;
}}
listener reinject {{
  address "127.0.0.1:{reinject}";
  tls none;
}}
listener slow {{
  address "127.0.0.1:{slow_listener}";
  tls none;
  proxy_filter "127.0.0.1:{slow_port}";
  proxy_filter_timeout 2s;
}}
route {{
  if recipient.domain in local {{
    deliver maildir;
  }}
}}
"#
    );
    let d = daemon(dir, &policy, port);
    let ctx = || format!("{}\n{}", d.log(), flog());
    let spool = dir.join("spool");

    let out = swaks(
        port,
        &["--from", "bob@other.test", "--to", "u@d.test", "--header", "Subject: lunch", "--body", "Noon at the cafe?"],
    );
    // The reply is the re-injection listener's, passed back by the filter.
    assert!(out.contains("<-  250 2.0.0 Queued as "), "{out}\n{}", ctx());
    wait_for(Duration::from_secs(30), "the clean message in mail/u", || !maildir(&dir.join("mail/u")).is_empty(), ctx);

    let out =
        swaks(port, &["--from", "eve@other.test", "--to", "u@d.test", "--header", "Subject: gtube", "--body", GTUBE]);
    assert!(
        out.contains("<** 550") && !out.contains("Queued as"),
        "GTUBE must get the filter's 5xx:\n{out}\n{}",
        ctx()
    );

    // Too slow: the filter's greeting never comes.
    let out = swaks(slow_listener, &["--from", "bob@other.test", "--to", "u@d.test", "--header", "Subject: slow"]);
    assert!(out.contains("<** 451 4.3.0"), "{out}\n{}", ctx());
    drop(slow);

    // Down: nothing listens any more.
    drop(filter.0.take().map(|mut c| {
        let _ = c.kill();
        c.wait()
    }));
    let out = swaks(port, &["--from", "bob@other.test", "--to", "u@d.test", "--header", "Subject: down"]);
    assert!(out.contains("<** 451 4.3.0"), "{out}\n{}", ctx());

    assert_eq!(queued(&spool), 0, "nothing waits in the queue:\n{}", ctx());
    std::thread::sleep(Duration::from_secs(2));
    let msgs = maildir(&dir.join("mail/u"));
    assert_eq!(msgs.len(), 1, "only the clean message is delivered, once:\n{msgs:?}\n{}", ctx());
    let m = &msgs[0];
    assert!(m.contains("Subject: lunch") && m.contains("X-Filtered: by proxsmtp"), "{m}");
    assert!(m.contains("X-Spam-Checker-Version: SpamAssassin"), "spamd saw it: {m}");
    let log = d.log();
    assert!(log.contains("proxy-filter") && log.contains("status=refused"), "{log}");
    assert!(log.contains("status=failed"), "{log}");
}
