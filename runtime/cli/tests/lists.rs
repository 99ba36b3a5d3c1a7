//! Mailing lists end to end (issue 18, R11, spec/language.md 4.9): two `mailc serve`
//! daemons on loopback, the list server (example.com, with the `http` listener) and a
//! reader's MX (reader.test, verifying DKIM against unbound), driven with swaks and curl:
//! subscribe by mail and by the web form, confirm (by mail and by the link), an expired
//! confirmation, a post received in a Maildir with its List-* headers and a DKIM signature
//! that covers them and verifies, one-click unsubscribe with a valid token (removed) and
//! forged ones (403), unsubscribe by the mailto address, and two bouncing subscribers (one
//! refused at RCPT, one bounced later to its VERP address) removed after `bounce_limit`
//! bounces, the owner told.
//!
//! No timed assertions: every wait is bounded only so a broken daemon fails the test.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const MAILC: &str = env!("CARGO_BIN_EXE_mailc");

fn need(path: &str, package: &str) {
    assert!(
        Path::new(path).exists(),
        "{path} not found (Debian package {package}); run tests/run.sh, which installs it"
    );
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

struct Guard(Option<Child>);
impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

struct TempDir(PathBuf);
impl TempDir {
    fn new(name: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let d = std::env::temp_dir().join(format!(
            "mailc-lists-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("temp dir");
        TempDir(d)
    }
    fn join(&self, p: &str) -> PathBuf {
        self.0.join(p)
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Run to completion (bounded); stdout and stderr together.
fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

fn wait_for(what: &str, mut ok: impl FnMut() -> bool, context: impl Fn() -> String) {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        if ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out waiting for {what}\n{}", context());
}

struct Daemon {
    _child: Guard,
    log: PathBuf,
}

impl Daemon {
    fn start(dir: &Path, policy: &str, ports: &[u16]) -> Daemon {
        std::fs::create_dir_all(dir).expect("dir");
        std::fs::write(dir.join("policy.mailpolicy"), policy).expect("policy");
        let log = dir.join("daemon.log");
        let child = Command::new(MAILC)
            .arg("serve")
            .arg("--policy")
            .arg(dir.join("policy.mailpolicy"))
            .args(["--user", &mailpolicy_test_support::current_user()])
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("mailc serve");
        let mut g = Guard(Some(child));
        let start = Instant::now();
        loop {
            if let Some(st) = g.0.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("mailc serve exited ({st}):\n{}", std::fs::read_to_string(&log).unwrap_or_default());
            }
            if ports.iter().all(|p| std::net::TcpStream::connect(("127.0.0.1", *p)).is_ok()) {
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(30), "not listening");
            std::thread::sleep(Duration::from_millis(20));
        }
        Daemon { _child: g, log }
    }
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

fn swaks(port: u16, args: &[&str]) -> String {
    need("/usr/bin/swaks", "swaks");
    let server = format!("127.0.0.1:{port}");
    run(Command::new("/usr/bin/swaks")
        .args(["--server", &server, "--timeout", "20", "--helo", "client.test"])
        .args(args))
    .1
}

/// curl: (HTTP status, body).
fn curl(args: &[&str]) -> (u16, String) {
    need("/usr/bin/curl", "curl");
    let (_, out) = run(Command::new("/usr/bin/curl").args(["-s", "-m", "20", "-w", "\n%{http_code}"]).args(args));
    let (body, code) = out.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

fn maildir(dir: &Path) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(dir.join("new")) else { return Vec::new() };
    let mut v: Vec<(PathBuf, String)> = rd
        .filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read_to_string(e.path()).ok().map(|s| (e.path(), s)))
        .collect();
    v.sort();
    v.into_iter().map(|(_, s)| s).collect()
}

fn unbound(dir: &Path, records: &[String]) -> (Guard, u16) {
    need("/usr/sbin/unbound", "unbound");
    let port = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp").local_addr().expect("addr").port();
    std::fs::create_dir_all(dir).expect("dir");
    let mut conf = format!(
        "server:\n  interface: 127.0.0.1@{port}\n  port: {port}\n  do-daemonize: no\n  username: \"\"\n  chroot: \"\"\n  directory: \"{}\"\n  pidfile: \"\"\n  use-syslog: no\n  logfile: \"\"\n  do-ip6: no\n  access-control: 127.0.0.0/8 allow\n  local-zone: \".\" static\n",
        dir.display()
    );
    for r in records {
        conf.push_str(&format!("  local-data: '{r}'\n"));
    }
    conf.push_str("remote-control:\n  control-enable: no\n");
    std::fs::write(dir.join("unbound.conf"), conf).expect("conf");
    let child = Command::new("/usr/sbin/unbound")
        .arg("-d")
        .arg("-c")
        .arg(dir.join("unbound.conf"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("unbound");
    std::thread::sleep(Duration::from_millis(300));
    (Guard(Some(child)), port)
}

/// The token in `confirm TOKEN` / `unsubscribe TOKEN` of a mail's Subject.
fn subject_token(mail: &str, word: &str) -> String {
    let line = mail.lines().find(|l| l.starts_with("Subject:")).unwrap_or("");
    let rest = line.split(word).nth(1).unwrap_or("");
    rest.split_whitespace().next().unwrap_or("").to_string()
}

/// A header field, unfolded.
fn field(mail: &str, name: &str) -> String {
    let mut out = String::new();
    let mut on = false;
    for l in mail.lines() {
        if l.is_empty() {
            break;
        }
        if on && (l.starts_with(' ') || l.starts_with('\t')) {
            out.push(' ');
            out.push_str(l.trim());
            continue;
        }
        on = false;
        if let Some((n, v)) = l.split_once(':') {
            if n.eq_ignore_ascii_case(name) && out.is_empty() {
                out = v.trim().to_string();
                on = true;
            }
        }
    }
    out
}

fn subscribers(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect()
}

#[test]
fn newsletter_subscribe_confirm_post_unsubscribe_and_bounces() {
    let t = TempDir::new("news");
    let (a_dir, b_dir) = (t.join("lists"), t.join("reader"));
    std::fs::create_dir_all(&a_dir).unwrap();
    // The list server's DKIM key (Ed25519) and its public half for the reader's DNS.
    let (ok, out) =
        run(Command::new("openssl").args(["genpkey", "-algorithm", "ed25519", "-out"]).arg(a_dir.join("dkim.pem")));
    assert!(ok, "openssl: {out}");
    let (ok, p) = run(Command::new("sh").arg("-c").arg(format!(
        "openssl pkey -in {} -pubout -outform DER | tail -c 32 | base64 -w0",
        a_dir.join("dkim.pem").display()
    )));
    assert!(ok && !p.trim().is_empty(), "{p}");
    let (_dns, dns_port) =
        unbound(&t.join("dns"), &[format!("mail._domainkey.example.com. TXT \"v=DKIM1; k=ed25519; p={}\"", p.trim())]);
    std::fs::write(a_dir.join("news.keys"), "1 an-old-key-still-accepted\n2 the-key-that-signs-now\n").unwrap();
    std::fs::write(a_dir.join("news.subscribers"), "# Example News: the daemon keeps this file\n").unwrap();
    let (a_smtp, a_web, b_smtp) = (free_port(), free_port(), free_port());
    let a_policy = format!(
        r#"list local = domains ["example.com"];
list nobody = cidr ["192.0.2.1"];
secret dkim = file "dkim.pem";
secret news_keys = file "news.keys";
table news_subscribers = list "news.subscribers";
table short_subscribers = list "short.subscribers";
mailing_list news = newsletter "news@example.com" {{
  subscribers news_subscribers;
  owner "editor@example.com";
  keys news_keys;
  web "https://lists.example.com/lists";
  description "Example News";
  bounce_limit 2;
}};
mailing_list short = newsletter "short@example.com" {{
  subscribers short_subscribers;
  owner "editor@example.com";
  keys news_keys;
  web "https://lists.example.com/lists";
  confirm_lifetime 1s;
}};
server {{ hostname "mx.example.com"; spool "spool"; maildir "mail"; local_domains local; networks nobody;
  dkim_key dkim; dkim_selector "mail"; dkim_domain "example.com"; }}
listener smtp {{ address "127.0.0.1:{a_smtp}"; tls none; }}
listener web {{ address "127.0.0.1:{a_web}"; protocol http; }}
on rcpt {{
  if recipient :is ["news@example.com", "short@example.com"] and not sender :is "editor@example.com" {{
    reject 550 5.7.1 "Only the editor posts to this list";
  }}
  if recipient.domain not in local {{ reject 554 5.7.1 "Relay access denied"; }}
  accept;
}}
route {{
  if recipient :is "news@example.com" {{ expand news; }}
  if recipient :is "short@example.com" {{ expand short; }}
  if recipient.domain in local {{ deliver maildir; }}
  deliver smtp "[127.0.0.1]:{b_smtp}" :tls none;
}}
"#
    );
    let b_policy = format!(
        r#"require "dkim";
list local = domains ["reader.test"];
server {{ hostname "mx.reader.test"; spool "spool"; maildir "mail"; local_domains local; dns_server "127.0.0.1:{dns_port}"; }}
listener smtp {{ address "127.0.0.1:{b_smtp}"; tls none; }}
on rcpt {{
  if recipient :is "gone@reader.test" {{ reject 550 5.1.1 "No such user"; }}
}}
on data {{
  header add "X-Dkim-Result" "${{dkim}}";
}}
route {{
  if recipient :is "late@reader.test" {{ reject 550 5.2.1 "Mailbox disabled"; }}
  if recipient.domain :is "example.com" {{ deliver smtp "[127.0.0.1]:{a_smtp}" :tls none; }}
  deliver maildir;
}}
"#
    );
    let b = Daemon::start(&b_dir, &b_policy, &[b_smtp]);
    let a = Daemon::start(&a_dir, &a_policy, &[a_smtp, a_web]);
    let logs = || format!("--- list server\n{}\n--- reader\n{}", a.log(), b.log());
    let web = format!("http://127.0.0.1:{a_web}/lists");
    let subs = a_dir.join("news.subscribers");

    // 1. alice subscribes by mail and confirms with the link (GET shows a page, POST acts).
    let out = swaks(
        a_smtp,
        &["--from", "alice@reader.test", "--to", "news-request@example.com", "--header", "Subject: subscribe"],
    );
    assert!(out.contains("Queued as") || out.contains("queued as"), "{out}");
    let alice_box = b_dir.join("mail/alice");
    wait_for("alice's confirmation", || !maildir(&alice_box).is_empty(), logs);
    let confirm_mail = maildir(&alice_box).remove(0);
    let token = subject_token(&confirm_mail, "confirm ");
    assert!(token.starts_with("2."), "signed with the newest key: {confirm_mail}");
    assert!(
        confirm_mail.contains(&format!("https://lists.example.com/lists/confirm?list=news&t={token}")),
        "{confirm_mail}"
    );
    assert!(subscribers(&subs).is_empty(), "nobody is subscribed before confirming");
    let (code, body) = curl(&[&format!("{web}/confirm?list=news&t={token}")]);
    assert_eq!(code, 200, "{body}");
    assert!(subscribers(&subs).is_empty(), "a GET changes nothing");
    let (code, body) = curl(&["-X", "POST", &format!("{web}/confirm?list=news&t={token}")]);
    assert_eq!(code, 200, "{body}");
    assert_eq!(subscribers(&subs), vec!["alice@reader.test"]);
    assert!(std::fs::read_to_string(&subs).unwrap().starts_with("# Example News"), "the file's comments are kept");
    // A forged confirmation (another address in alice's token) is refused.
    let forged = {
        let parts: Vec<&str> = token.split('.').collect();
        format!("{}.{}.bWFsbG9yeUBldmlsLnRlc3Q.{}", parts[0], parts[1], parts[3])
    };
    let (code, _) = curl(&["-X", "POST", &format!("{web}/confirm?list=news&t={forged}")]);
    assert_eq!(code, 403);

    // 2. bob subscribes with the web form and confirms by replying to the mail.
    let (code, body) = curl(&["-d", "list=news", "-d", "address=bob@reader.test", &format!("{web}/subscribe")]);
    assert_eq!(code, 200, "{body}");
    let (code, _) = curl(&["-d", "list=news", "-d", "address=bob@reader.test", &format!("{web}/subscribe")]);
    assert_eq!(code, 429, "a second confirmation within minutes is refused");
    let bob_box = b_dir.join("mail/bob");
    wait_for("bob's confirmation", || !maildir(&bob_box).is_empty(), logs);
    let btoken = subject_token(&maildir(&bob_box)[0], "confirm ");
    let reply = format!("Subject: Re: confirm {btoken}");
    let out = swaks(a_smtp, &["--from", "bob@reader.test", "--to", "news-request@example.com", "--header", &reply]);
    assert!(out.to_ascii_lowercase().contains("queued as"), "{out}");
    wait_for("bob subscribed", || subscribers(&subs).contains(&"bob@reader.test".to_string()), logs);

    // The two bouncing subscribers, confirmed with the web link.
    for who in ["gone", "late"] {
        let (code, _) =
            curl(&["-d", "list=news", "-d", &format!("address={who}@reader.test"), &format!("{web}/subscribe")]);
        assert_eq!(code, 200);
    }
    // gone@ is refused at RCPT by the reader's MX: its confirmation bounces to the null
    // sender's nobody; its token is read from the list server's log instead.
    wait_for(
        "late's confirmation",
        || !maildir(&b_dir.join("mail/late")).is_empty() || a.log().contains("late@reader.test"),
        logs,
    );
    for who in ["gone", "late"] {
        let id_line = a
            .log()
            .lines()
            .find(|l| l.contains("list-mail") && l.contains(&format!("{who}@reader.test")))
            .map(str::to_string)
            .unwrap_or_default();
        let tok = id_line.split("confirm ").nth(1).unwrap_or("").split(['"', ' ']).next().unwrap_or("").to_string();
        assert!(!tok.is_empty(), "no confirmation logged for {who}: {}", a.log());
        let (code, body) = curl(&["-X", "POST", &format!("{web}/confirm?list=news&t={tok}")]);
        assert_eq!(code, 200, "{body}");
    }
    assert_eq!(subscribers(&subs).len(), 4, "{:?}", subscribers(&subs));

    // An expired confirmation (confirm_lifetime 1s) is refused with 410.
    let (code, _) = curl(&["-d", "list=short", "-d", "address=alice@reader.test", &format!("{web}/subscribe")]);
    assert_eq!(code, 200);
    wait_for("the short list's confirmation", || maildir(&alice_box).len() == 2, logs);
    let stoken = maildir(&alice_box).iter().map(|m| subject_token(m, "confirm ")).find(|t| *t != token).unwrap();
    std::thread::sleep(Duration::from_millis(2100));
    let (code, _) = curl(&["-X", "POST", &format!("{web}/confirm?list=short&t={stoken}")]);
    assert_eq!(code, 410);
    assert!(subscribers(&a_dir.join("short.subscribers")).is_empty());

    // 3. Only the editor posts; the post reaches each subscriber with its own headers.
    let out = swaks(a_smtp, &["--from", "mallory@evil.test", "--to", "news@example.com", "--header", "Subject: spam"]);
    assert!(out.contains("550 5.7.1 Only the editor"), "{out}");
    let post = |subject: &str| {
        let s = format!("Subject: {subject}");
        let out = swaks(
            a_smtp,
            &[
                "--from",
                "editor@example.com",
                "--to",
                "news@example.com",
                "--header",
                &s,
                "--header",
                "List-Unsubscribe: <https://evil.test/>",
                "--body",
                "This week's news.",
            ],
        );
        assert!(out.to_ascii_lowercase().contains("queued as"), "{out}");
    };
    post("Issue 1");
    let issue = |dir: &Path, s: &str| maildir(dir).into_iter().find(|m| m.contains(&format!("Subject: {s}")));
    wait_for(
        "issue 1 at alice and bob",
        || issue(&alice_box, "Issue 1").is_some() && issue(&bob_box, "Issue 1").is_some(),
        logs,
    );
    let am = issue(&alice_box, "Issue 1").unwrap();
    let bm = issue(&bob_box, "Issue 1").unwrap();
    assert_eq!(field(&am, "Return-Path"), "<owner-news+alice=reader.test@example.com>", "VERP: {am}");
    assert_eq!(field(&bm, "Return-Path"), "<owner-news+bob=reader.test@example.com>", "VERP: {bm}");
    assert_eq!(field(&am, "List-Id"), "Example News <news.example.com>");
    assert_eq!(field(&am, "List-Unsubscribe-Post"), "List-Unsubscribe=One-Click");
    let unsub = field(&am, "List-Unsubscribe");
    assert!(unsub.starts_with("<https://lists.example.com/lists/unsubscribe?list=news&t=2."), "{unsub}");
    assert!(unsub.contains("<mailto:news-request@example.com?subject=unsubscribe%202."), "{unsub}");
    assert!(!am.contains("evil.test"), "the poster's List-Unsubscribe is replaced: {am}");
    assert_ne!(unsub, field(&bm, "List-Unsubscribe"), "each subscriber has a token of their own");
    // The list's DKIM signature covers both RFC 8058 fields and verifies at the reader's MX.
    let sig = field(&am, "DKIM-Signature").to_ascii_lowercase().replace(' ', "");
    let h: Vec<&str> = sig.split(';').find_map(|t| t.strip_prefix("h=")).unwrap_or("").split(':').collect();
    assert!(
        sig.contains("d=example.com") && h.contains(&"list-unsubscribe") && h.contains(&"list-unsubscribe-post"),
        "{sig}"
    );
    assert_eq!(field(&am, "X-Dkim-Result"), "pass", "{am}");

    // 4. One-click unsubscribe: forged tokens are refused, alice's own removes her.
    let url = unsub.split(['<', '>']).nth(1).unwrap().replace("https://lists.example.com/lists", &web);
    let alice_token = url.split("&t=").nth(1).unwrap().to_string();
    let parts: Vec<&str> = alice_token.split('.').collect();
    let bob_as_alice = format!("{web}/unsubscribe?list=news&t={}.Ym9iQHJlYWRlci50ZXN0.{}", parts[0], parts[2]);
    let bad_mac = format!("{web}/unsubscribe?list=news&t={}.{}.AAAAAAAAAAAAAAAAAAAAAA", parts[0], parts[1]);
    for forged in [bob_as_alice, bad_mac, format!("{web}/unsubscribe?list=news&t=junk")] {
        let (code, _) = curl(&["-d", "List-Unsubscribe=One-Click", &forged]);
        assert_eq!(code, 403, "{forged}");
    }
    assert!(subscribers(&subs).contains(&"bob@reader.test".to_string()));
    let (code, body) = curl(&["-d", "List-Unsubscribe=One-Click", &url]);
    assert_eq!(code, 200, "{body}");
    assert!(!subscribers(&subs).contains(&"alice@reader.test".to_string()), "{:?}", subscribers(&subs));

    // Bob leaves by the mailto address of his List-Unsubscribe.
    let bunsub = field(&bm, "List-Unsubscribe");
    let mailto_subject = bunsub.split("subject=").nth(1).unwrap().trim_end_matches('>').replace("%20", " ");
    let s = format!("Subject: {mailto_subject}");
    let out = swaks(a_smtp, &["--from", "bob@reader.test", "--to", "news-request@example.com", "--header", &s]);
    assert!(out.to_ascii_lowercase().contains("queued as"), "{out}");
    wait_for("bob unsubscribed", || !subscribers(&subs).contains(&"bob@reader.test".to_string()), logs);

    // 5. gone@ (refused at RCPT: the list server's own DSN) and late@ (bounced later by the
    //    reader's MX to its VERP address): the second post's bounces remove both.
    let bounces = || a.log().lines().filter(|l| l.contains("list-bounce")).count();
    wait_for("two bounces of issue 1", || bounces() >= 2, logs);
    assert_eq!(subscribers(&subs).len(), 2, "one bounce each is not yet the limit");
    post("Issue 2");
    let editor = a_dir.join("mail/mail/editor");
    let editor = if editor.exists() { editor } else { a_dir.join("mail/editor") };
    wait_for("both bouncing subscribers removed", || subscribers(&subs).is_empty(), logs);
    wait_for("the owner told twice", || maildir(&editor).len() == 2, logs);
    let notices = maildir(&editor).join("\n");
    assert!(notices.contains("gone@reader.test removed from news (bounces)"), "{notices}");
    assert!(notices.contains("late@reader.test removed from news (bounces)"), "{notices}");
    assert!(
        issue(&alice_box, "Issue 2").is_none() && issue(&bob_box, "Issue 2").is_none(),
        "unsubscribed is unsubscribed"
    );
    let log = a.log();
    assert!(log.contains("owner-news+late=reader.test@example.com"), "late's bounce came to its VERP address");
}
