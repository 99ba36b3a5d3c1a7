//! Mailing lists end to end (issue 18, R11, spec/language.md 4.9): two `mailc serve`
//! daemons on loopback, the list server (example.com, with the `http` listener) and a
//! reader's MX (reader.test, verifying DKIM against unbound, and d.test, delivered over LMTP
//! to a real Dovecot), driven with swaks and curl:
//! subscribe by mail and by the web form, confirm (by mail and by the link), an expired
//! confirmation, a post received in a Maildir and in Dovecot's Maildir with its List-*
//! headers and a DKIM signature that covers them and verifies, one-click unsubscribe with a valid token (removed) and
//! forged ones (403), unsubscribe by the mailto address, and two bouncing subscribers (one
//! refused at RCPT, one bounced later to its VERP address) removed after `bounce_limit`
//! bounces, the owner told.
//!
//! No timed assertions: every wait is bounded only so a broken daemon fails the test.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use mailpolicy_test_support::{free_port, maildir, need, Dovecot, Serve, TempDir, Unbound};

const MAILC: &str = env!("CARGO_BIN_EXE_mailc");

/// Run to completion (bounded); stdout and stderr together.
fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

fn wait_for(what: &str, ok: impl FnMut() -> bool, context: impl Fn() -> String) {
    mailpolicy_test_support::wait_for(Duration::from_secs(30), what, ok, context)
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
    let dkim_record = format!("mail._domainkey.example.com. TXT \"v=DKIM1; k=ed25519; p={}\"", p.trim());
    let dns = Unbound::start(&["."], &[&dkim_record], &[]);
    // The reader's mailbox server: its MX hands d.test to Dovecot over LMTP.
    let dovecot = Dovecot::start();
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
list local = domains ["reader.test", "d.test"];
server {{ hostname "mx.reader.test"; spool "spool"; maildir "mail"; local_domains local; dns_server "{dns}"; }}
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
  if recipient.domain :is "d.test" {{ deliver lmtp "[127.0.0.1]:{lmtp}"; }}
  deliver maildir;
}}
"#,
        dns = dns.addr(),
        lmtp = dovecot.port,
    );
    let b = Serve::start(MAILC, &b_dir, &b_policy, &[b_smtp]);
    let a = Serve::start(MAILC, &a_dir, &a_policy, &[a_smtp, a_web]);
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

    // u1@d.test reads mail in Dovecot (the reader's MX delivers d.test over LMTP):
    // subscribed with the web form, confirmed with the link of the mail Dovecot stored.
    let (code, _) = curl(&["-d", "list=news", "-d", "address=u1@d.test", &format!("{web}/subscribe")]);
    assert_eq!(code, 200);
    let dlogs = || format!("{}\n--- dovecot\n{}", logs(), dovecot.log_text());
    wait_for("u1's confirmation in Dovecot", || !maildir(&dovecot.mail).is_empty(), dlogs);
    let utoken = subject_token(&maildir(&dovecot.mail)[0], "confirm ");
    let (code, body) = curl(&["-X", "POST", &format!("{web}/confirm?list=news&t={utoken}")]);
    assert_eq!(code, 200, "{body}");
    assert!(subscribers(&subs).contains(&"u1@d.test".to_string()), "{:?}", subscribers(&subs));

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
    assert_eq!(subscribers(&subs).len(), 5, "{:?}", subscribers(&subs));

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
    // The same post in Dovecot's Maildir (LMTP), with u1's own VERP sender and fields.
    wait_for("issue 1 in Dovecot", || issue(&dovecot.mail, "Issue 1").is_some(), dlogs);
    let um = issue(&dovecot.mail, "Issue 1").unwrap();
    assert_eq!(field(&um, "Return-Path"), "<owner-news+u1=d.test@example.com>", "VERP: {um}");
    assert_eq!(field(&um, "List-Id"), "Example News <news.example.com>");
    assert_eq!(field(&um, "List-Unsubscribe-Post"), "List-Unsubscribe=One-Click");
    let uunsub = field(&um, "List-Unsubscribe");
    assert!(uunsub.starts_with("<https://lists.example.com/lists/unsubscribe?list=news&t=2."), "{uunsub}");
    assert!(!um.contains("evil.test"), "{um}");
    assert_eq!(field(&um, "X-Dkim-Result"), "pass", "{um}");

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
    assert_eq!(subscribers(&subs).len(), 3, "one bounce each is not yet the limit");
    post("Issue 2");
    let editor = a_dir.join("mail/mail/editor");
    let editor = if editor.exists() { editor } else { a_dir.join("mail/editor") };
    wait_for("both bouncing subscribers removed", || subscribers(&subs) == ["u1@d.test"], logs);
    wait_for("the owner told twice", || maildir(&editor).len() == 2, logs);
    let notices = maildir(&editor).join("\n");
    assert!(notices.contains("gone@reader.test removed from news (bounces)"), "{notices}");
    assert!(notices.contains("late@reader.test removed from news (bounces)"), "{notices}");
    assert!(
        issue(&alice_box, "Issue 2").is_none() && issue(&bob_box, "Issue 2").is_none(),
        "unsubscribed is unsubscribed"
    );
    wait_for("issue 2 in Dovecot", || issue(&dovecot.mail, "Issue 2").is_some(), dlogs);
    let log = a.log();
    assert!(log.contains("owner-news+late=reader.test@example.com"), "late's bounce came to its VERP address");
}

// ---------------------------------------------------------------- subscribers in a directory or a database

/// The policy of a list server with one list, `news@example.com`, whose subscribers are the
/// table `news_subscribers` that `table` declares; only editor@example.com posts, and every
/// local part of example.com and reader.test is delivered to its own Maildir. `list` and
/// `server` are more settings of the list and of the server, `listeners` the listeners.
fn news_policy(table: &str, list: &str, server: &str, listeners: &str) -> String {
    format!(
        r#"list local = domains ["example.com", "reader.test"];
list nobody = cidr ["192.0.2.1"];
secret news_keys = file "news.keys";
{table}
mailing_list news = newsletter "news@example.com" {{
  subscribers news_subscribers;
  owner "editor@example.com";
  keys news_keys;
  {list}
}};
server {{ hostname "mx.example.com"; spool "spool"; maildir "mail"; local_domains local; networks nobody; {server} }}
{listeners}
on rcpt {{
  if recipient :is "news@example.com" and not sender :is "editor@example.com" {{
    reject 550 5.7.1 "Only the editor posts to this list";
  }}
}}
route {{
  if recipient :is "news@example.com" {{ expand news; }}
  deliver maildir;
}}
"#
    )
}

/// One list server whose subscribers live in `table` (the declaration of the table
/// `news_subscribers`, an `sql` or `ldap` table), every local part delivered to its own
/// Maildir, and `members` reading the back end itself (rows, attribute values), in any order.
/// Drives, with swaks and curl: two subscriptions by the web form and one by mail, each
/// confirmed (only then in the back end), a forged confirmation (refused, nothing changed),
/// a post to all three, a one-click unsubscribe (removed from the back end) and a forged one
/// (refused), and a subscriber removed after `bounce_limit` VERP bounces, the owner told.
/// Returns the daemon and the web endpoint's base URL for what the caller tests next.
fn backend_round_trip(t: &TempDir, table: &str, members: &dyn Fn() -> Vec<String>) -> (Serve, String) {
    let dir = t.join("lists");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("news.keys"), "1 the-key-that-signs\n").unwrap();
    let (smtp, http) = (free_port(), free_port());
    let policy = news_policy(
        table,
        r#"web "https://lists.example.com"; bounce_limit 2;"#,
        "",
        &format!(
            "listener smtp {{ address \"127.0.0.1:{smtp}\"; tls none; }}\n\
             listener web {{ address \"127.0.0.1:{http}\"; protocol http; }}"
        ),
    );
    let d = Serve::start(MAILC, &dir, &policy, &[smtp, http]);
    let web = format!("http://127.0.0.1:{http}");
    let logs = || d.log();
    let sorted = || {
        let mut m = members();
        m.sort();
        m
    };
    let confirmation = |who: &str| {
        wait_for(&format!("{who}'s confirmation"), || !d.mail(who).is_empty(), logs);
        subject_token(&d.mail(who)[0], "confirm ")
    };
    assert!(sorted().is_empty(), "{:?}", sorted());

    // alice and bob by the web form, confirmed by the link; carol by mail, confirmed by reply.
    for who in ["alice", "bob"] {
        let (code, body) =
            curl(&["-d", "list=news", "-d", &format!("address={who}@reader.test"), &format!("{web}/subscribe")]);
        assert_eq!(code, 200, "{body}");
    }
    let out = swaks(
        smtp,
        &["--from", "carol@reader.test", "--to", "news-request@example.com", "--header", "Subject: subscribe"],
    );
    assert!(out.to_ascii_lowercase().contains("queued as"), "{out}");
    let (ta, tb, tc) = (confirmation("alice"), confirmation("bob"), confirmation("carol"));
    assert!(sorted().is_empty(), "nobody is in the back end before confirming: {:?}", sorted());
    for tok in [&ta, &tb] {
        let (code, body) = curl(&["-X", "POST", &format!("{web}/confirm?list=news&t={tok}")]);
        assert_eq!(code, 200, "{body}");
    }
    assert_eq!(sorted(), ["alice@reader.test", "bob@reader.test"]);
    let reply = format!("Subject: Re: confirm {tc}");
    let out = swaks(smtp, &["--from", "carol@reader.test", "--to", "news-request@example.com", "--header", &reply]);
    assert!(out.to_ascii_lowercase().contains("queued as"), "{out}");
    wait_for("carol in the back end", || sorted().len() == 3, || format!("{:?}\n{}", sorted(), d.log()));
    assert_eq!(sorted(), ["alice@reader.test", "bob@reader.test", "carol@reader.test"]);
    // Confirming again changes nothing; a forged confirmation (mallory in alice's token) is refused.
    let (code, _) = curl(&["-X", "POST", &format!("{web}/confirm?list=news&t={ta}")]);
    assert_eq!(code, 200);
    let p: Vec<&str> = ta.split('.').collect();
    let forged = format!("{}.{}.bWFsbG9yeUBldmlsLnRlc3Q.{}", p[0], p[1], p[3]);
    let (code, _) = curl(&["-X", "POST", &format!("{web}/confirm?list=news&t={forged}")]);
    assert_eq!(code, 403);
    assert_eq!(sorted().len(), 3, "{:?}", sorted());

    // A post reaches the three, each with the unsubscribe link of their own.
    let out = swaks(
        smtp,
        &[
            "--from",
            "editor@example.com",
            "--to",
            "news@example.com",
            "--header",
            "Subject: Issue 1",
            "--body",
            "News.",
        ],
    );
    assert!(out.to_ascii_lowercase().contains("queued as"), "{out}");
    let post = |who: &str| d.mail(who).into_iter().find(|m| m.contains("Subject: Issue 1"));
    wait_for("issue 1 at all three", || ["alice", "bob", "carol"].iter().all(|w| post(w).is_some()), logs);
    let am = post("alice").unwrap();
    assert_eq!(field(&am, "Return-Path"), "<owner-news+alice=reader.test@example.com>", "{am}");
    let unsub = field(&am, "List-Unsubscribe");
    let url = unsub.split(['<', '>']).nth(1).unwrap_or_default().replace("https://lists.example.com", &web);
    assert!(url.contains("/unsubscribe?list=news&t=1."), "{unsub}");

    // One-click: a forged token is refused and changes nothing; alice's own removes her.
    let t_alice = url.split("&t=").nth(1).unwrap().to_string();
    let p: Vec<&str> = t_alice.split('.').collect();
    let carol_as_alice = format!("{web}/unsubscribe?list=news&t={}.Y2Fyb2xAcmVhZGVyLnRlc3Q.{}", p[0], p[2]);
    let (code, _) = curl(&["-d", "List-Unsubscribe=One-Click", &carol_as_alice]);
    assert_eq!(code, 403);
    assert_eq!(sorted().len(), 3, "{:?}", sorted());
    let (code, body) = curl(&["-d", "List-Unsubscribe=One-Click", &url]);
    assert_eq!(code, 200, "{body}");
    assert_eq!(sorted(), ["bob@reader.test", "carol@reader.test"]);

    // bob bounces (null-sender mails to his VERP address): removed at the second, the owner told.
    let bounce = || {
        let out = swaks(
            smtp,
            &[
                "--from",
                "<>",
                "--to",
                "owner-news+bob=reader.test@example.com",
                "--header",
                "Subject: Undeliverable: Issue 1",
                "--body",
                "bob's mailbox is gone",
            ],
        );
        assert!(out.to_ascii_lowercase().contains("queued as"), "{out}");
    };
    bounce();
    wait_for("bob's first bounce", || d.log().contains("list-bounce"), logs);
    assert_eq!(sorted(), ["bob@reader.test", "carol@reader.test"], "one bounce is not yet the limit");
    bounce();
    wait_for("bob removed", || sorted() == ["carol@reader.test"], || format!("{:?}\n{}", sorted(), d.log()));
    wait_for(
        "the owner told",
        || d.mail("editor").iter().any(|m| m.contains("bob@reader.test removed from news (bounces)")),
        logs,
    );
    (d, web)
}

/// `psql` against the test's cluster: the rows of `sql`, one per line.
fn psql(pg: &mailpolicy_test_support::Postgres, sql: &str) -> Vec<String> {
    need("/usr/bin/psql", "postgresql-client");
    let (ok, out) = run(Command::new("/usr/bin/psql").args([
        "-X",
        "-q",
        "-A",
        "-t",
        "-v",
        "ON_ERROR_STOP=1",
        "-d",
        &pg.url,
        "-c",
        sql,
    ]));
    assert!(ok, "psql {sql}: {out}");
    out.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_string).collect()
}

/// Subscribers in a real PostgreSQL table (`members`, `insert`, `delete`): every change the
/// list makes is a row inserted or deleted, another list's rows are left alone, and a
/// database that is down answers the web endpoint 503 instead of losing the confirmation.
#[test]
fn newsletter_subscribers_in_postgresql() {
    let t = TempDir::new("news-sql");
    let pg = mailpolicy_test_support::Postgres::start();
    psql(
        &pg,
        "CREATE TABLE subscribers (list text NOT NULL, address text NOT NULL, PRIMARY KEY (list, address)); \
         INSERT INTO subscribers VALUES ('other', 'alice@reader.test');",
    );
    let table = format!(
        r#"table news_subscribers = sql {{
  url "{url}";
  query "SELECT address FROM subscribers WHERE list = 'news' AND address = lower($1)";
  members "SELECT address FROM subscribers WHERE list = 'news'";
  insert "INSERT INTO subscribers (list, address) VALUES ('news', $1) ON CONFLICT DO NOTHING";
  delete "DELETE FROM subscribers WHERE list = 'news' AND address = $1";
}};"#,
        url = pg.url
    );
    let rows = || psql(&pg, "SELECT address FROM subscribers WHERE list = 'news'");
    let (d, web) = backend_round_trip(&t, &table, &rows);
    assert_eq!(psql(&pg, "SELECT address FROM subscribers WHERE list = 'other'"), ["alice@reader.test"]);

    // dave's confirmation arrives, then the database goes away: confirming answers 503
    // (try again later), never a success that added nobody.
    let (code, _) = curl(&["-d", "list=news", "-d", "address=dave@reader.test", &format!("{web}/subscribe")]);
    assert_eq!(code, 200);
    wait_for("dave's confirmation", || !d.mail("dave").is_empty(), || d.log());
    let tok = subject_token(&d.mail("dave")[0], "confirm ");
    drop(pg);
    let (code, body) = curl(&["-X", "POST", &format!("{web}/confirm?list=news&t={tok}")]);
    assert_eq!(code, 503, "{body}");
}

/// `ldapsearch` of the values of `attribute` on the entry `dn` (anonymous: slapd lets
/// anyone read), as stored.
fn ldap_values(port: u16, dn: &str, attribute: &str) -> Vec<String> {
    need("/usr/bin/ldapsearch", "ldap-utils");
    let url = format!("ldap://127.0.0.1:{port}");
    let (ok, out) = run(Command::new("/usr/bin/ldapsearch").args([
        "-x",
        "-LLL",
        "-o",
        "ldif-wrap=no",
        "-H",
        &url,
        "-b",
        dn,
        "-s",
        "base",
        "(objectClass=*)",
        attribute,
    ]));
    assert!(ok, "ldapsearch: {out}");
    let prefix = format!("{attribute}: ");
    out.lines().filter_map(|l| l.strip_prefix(&prefix)).map(str::to_string).collect()
}

/// Subscribers in a real OpenLDAP directory, as a site keeps a mailing list there: one
/// group entry (`nisMailAlias`) whose multi-valued `rfc822MailMember` holds one subscriber
/// each. Confirmations add a value and unsubscribes and bounces delete one (LDAP modify as
/// the table's `bind_dn`); the directory's own case-insensitive matching keeps an address
/// an administrator entered as `Zed@Reader.test` one subscriber; a table whose account may
/// not write answers the web endpoint 503 and changes nothing.
#[test]
fn newsletter_subscribers_in_ldap() {
    let suffix = "dc=example,dc=com";
    let group = "cn=news,ou=lists,dc=example,dc=com";
    let ldif = "dn: dc=example,dc=com\nobjectClass: dcObject\nobjectClass: organization\ndc: example\no: Example\n\n\
                dn: ou=lists,dc=example,dc=com\nobjectClass: organizationalUnit\nou: lists\n\n\
                dn: cn=news,ou=lists,dc=example,dc=com\nobjectClass: nisMailAlias\ncn: news\n\n\
                dn: cn=other,ou=lists,dc=example,dc=com\nobjectClass: nisMailAlias\ncn: other\nrfc822MailMember: alice@reader.test\n";
    let slapd = mailpolicy_test_support::Slapd::start(suffix, ldif);
    let t = TempDir::new("news-ldap");
    std::fs::create_dir_all(t.join("lists")).unwrap();
    std::fs::write(t.join("lists/ldap.pw"), "secret\n").unwrap();
    std::fs::write(t.join("lists/ro.keys"), "1 read-only\n").unwrap();
    let port = slapd.port;
    let table = format!(
        r#"secret ldap_pw = file "ldap.pw";
table news_subscribers = ldap {{
  url "ldap://127.0.0.1:{port}";
  base "{group}";
  scope base;
  filter "(rfc822MailMember=%s)";
  attribute "rfc822MailMember";
  bind_dn "cn=admin,{suffix}";
  password ldap_pw;
}};
secret ro_keys = file "ro.keys";
table read_only = ldap {{
  url "ldap://127.0.0.1:{port}";
  base "cn=other,ou=lists,{suffix}";
  scope base;
  filter "(rfc822MailMember=%s)";
  attribute "rfc822MailMember";
}};
mailing_list other = newsletter "other@example.com" {{
  subscribers read_only;
  owner "editor@example.com";
  keys ro_keys;
  web "https://lists.example.com";
}};"#
    );
    let values = || ldap_values(port, group, "rfc822MailMember");
    let (d, web) = backend_round_trip(&t, &table, &|| values().iter().map(|v| v.to_ascii_lowercase()).collect());
    assert_eq!(values(), ["carol@reader.test"], "what is left, as the daemon wrote it");

    // An address an administrator entered in another case is the same subscriber.
    need("/usr/bin/ldapmodify", "ldap-utils");
    let change = format!("dn: {group}\nchangetype: modify\nadd: rfc822MailMember\nrfc822MailMember: Zed@Reader.test\n");
    std::fs::write(t.join("zed.ldif"), change).unwrap();
    let url = format!("ldap://127.0.0.1:{port}");
    let (ok, out) = run(Command::new("/usr/bin/ldapmodify")
        .args(["-x", "-H", &url, "-D", &format!("cn=admin,{suffix}"), "-w", "secret", "-f"])
        .arg(t.join("zed.ldif")));
    assert!(ok, "ldapmodify: {out}");
    let (code, _) = curl(&["-d", "list=news", "-d", "address=zed@reader.test", &format!("{web}/subscribe")]);
    assert_eq!(code, 200);
    wait_for("zed's confirmation", || !d.mail("zed").is_empty(), || d.log());
    let tok = subject_token(&d.mail("zed")[0], "confirm ");
    let (code, body) = curl(&["-X", "POST", &format!("{web}/confirm?list=news&t={tok}")]);
    assert_eq!(code, 200, "{body}");
    let mut v = values();
    v.sort();
    assert_eq!(v, ["Zed@Reader.test", "carol@reader.test"], "no second value for zed");

    // The read-only table: slapd refuses the anonymous write (insufficientAccess), 503.
    let other = "cn=other,ou=lists,dc=example,dc=com";
    let (code, _) = curl(&["-d", "list=other", "-d", "address=bob@reader.test", &format!("{web}/subscribe")]);
    assert_eq!(code, 200);
    wait_for(
        "bob's confirmation for other",
        || d.mail("bob").iter().any(|m| m.contains("other@example.com")),
        || d.log(),
    );
    let m = d.mail("bob").into_iter().find(|m| m.contains("other@example.com")).unwrap();
    let tok = subject_token(&m, "confirm ");
    let (code, body) = curl(&["-X", "POST", &format!("{web}/confirm?list=other&t={tok}")]);
    assert_eq!(code, 503, "{body}");
    assert_eq!(ldap_values(port, other, "rfc822MailMember"), ["alice@reader.test"]);
}

/// `server { admin "..."; admin_lists true; }`: the admin listener serves the lists' endpoint
/// (subscribe, confirm, one-click unsubscribe; forged tokens refused) and still the metrics;
/// without `admin_lists` it serves the metrics alone (the lists' paths are not found there).
#[test]
fn newsletter_endpoint_on_the_admin_listener() {
    let t = TempDir::new("news-admin");
    let policy = |smtp: u16, admin: u16, mount: bool| {
        news_policy(
            r#"table news_subscribers = list "news.subscribers";"#,
            r#"web "https://www.example.com/lists";"#,
            &format!("admin \"127.0.0.1:{admin}\"; admin_lists {mount};"),
            &format!("listener smtp {{ address \"127.0.0.1:{smtp}\"; tls none; }}"),
        )
    };
    let dir = t.join("lists");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("news.keys"), "1 the-key\n").unwrap();
    let (smtp, admin) = (free_port(), free_port());
    let d = Serve::start(MAILC, &dir, &policy(smtp, admin, true), &[smtp, admin]);
    let base = format!("http://127.0.0.1:{admin}");
    let web = format!("{base}/lists");
    let subs = dir.join("news.subscribers");

    let (code, body) = curl(&[&format!("{base}/metrics")]);
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("# EOF"), "the metrics are still served: {body}");
    let (code, body) = curl(&["-d", "list=news", "-d", "address=alice@reader.test", &format!("{web}/subscribe")]);
    assert_eq!(code, 200, "{body}");
    wait_for("alice's confirmation", || !d.mail("alice").is_empty(), || d.log());
    let confirm = d.mail("alice").remove(0);
    let tok = subject_token(&confirm, "confirm ");
    assert!(confirm.contains(&format!("https://www.example.com/lists/confirm?list=news&t={tok}")), "{confirm}");
    let (code, body) = curl(&["-X", "POST", &format!("{web}/confirm?list=news&t={tok}")]);
    assert_eq!(code, 200, "{body}");
    assert_eq!(subscribers(&subs), ["alice@reader.test"]);

    let out =
        swaks(smtp, &["--from", "editor@example.com", "--to", "news@example.com", "--header", "Subject: Issue 1"]);
    assert!(out.to_ascii_lowercase().contains("queued as"), "{out}");
    let post = || d.mail("alice").into_iter().find(|m| m.contains("Subject: Issue 1"));
    wait_for("issue 1", || post().is_some(), || d.log());
    let unsub = field(&post().unwrap(), "List-Unsubscribe");
    let url = unsub.split(['<', '>']).nth(1).unwrap_or_default().replace("https://www.example.com", &base);
    assert!(url.starts_with(&format!("{web}/unsubscribe?list=news&t=1.")), "{unsub}");
    let forged = format!("{}AAAA", url.trim_end_matches(|c: char| c != '.'));
    let (code, _) = curl(&["-d", "List-Unsubscribe=One-Click", &forged]);
    assert_eq!(code, 403, "{forged}");
    assert_eq!(subscribers(&subs), ["alice@reader.test"]);
    let (code, body) = curl(&["-d", "List-Unsubscribe=One-Click", &url]);
    assert_eq!(code, 200, "{body}");
    assert!(subscribers(&subs).is_empty());
    drop(d);

    // Without admin_lists: metrics only.
    let (smtp, admin) = (free_port(), free_port());
    let dir = t.join("metrics-only");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("news.keys"), "1 the-key\n").unwrap();
    let d = Serve::start(MAILC, &dir, &policy(smtp, admin, false), &[smtp, admin]);
    let base = format!("http://127.0.0.1:{admin}");
    let (code, _) = curl(&[&format!("{base}/metrics")]);
    assert_eq!(code, 200);
    let (code, _) = curl(&[&format!("{base}/lists/subscribe?list=news")]);
    assert_eq!(code, 404, "{}", d.log());
    let (code, _) = curl(&["-d", "list=news", "-d", "address=bob@reader.test", &format!("{base}/lists/subscribe")]);
    assert_eq!(code, 405);
}
