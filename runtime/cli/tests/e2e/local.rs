//! Issue 14: local submission (sendmail, the maildrop, git send-email, mailc table query).

use super::*;

// ================================================================== issue 14: local submission

/// The base policy, plus a rule that shows what the policy sees of a local submission.
fn local_policy(port: u16, relay: u16) -> String {
    let mut p = base_policy(port, relay, "none");
    p.push_str(
        r#"
on data {
  if listener :is "local" and authenticated and auth.mechanism :is "local" {
    header add "X-Local-User" "${auth.user}";
  }
}
"#,
    );
    p
}

/// `mailc sendmail ARGS` (or the binary under another name, for argv[0]), with `input` on
/// standard input and the policy named by the environment, as cron and git call it.
pub(crate) fn sendmail_as(program: &Path, args: &[&str], input: &[u8], policy: &Path) -> (i32, String) {
    use std::io::Write;
    let mut child = Command::new(program)
        .args(args)
        .env("MAILPOLICY_POLICY", policy)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run sendmail");
    if let Some(mut i) = child.stdin.take() {
        // A usage error ends sendmail before it reads its input (a closed pipe here).
        let _ = i.write_all(input);
    }
    let out = child.wait_with_output().expect("sendmail ends");
    (
        out.status.code().unwrap_or(-1),
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
    )
}

/// The binary under the names other software calls it by (`sendmail`, `mailq`).
fn link_as(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    let _ = std::fs::remove_file(&p);
    std::os::unix::fs::symlink(MAILC, &p).expect("symlink mailc");
    p
}

#[test]
fn cron_style_sendmail_goes_through_the_policy() {
    let t = TempDir::new("sendmail");
    let (port, relay) = (free_port(), free_port());
    let d = Daemon::start(t.path(), &local_policy(port, relay), &[port]);
    let policy = t.join("policy.mailpolicy");
    let sendmail = link_as(t.path(), "sendmail");

    // cron: `... | sendmail -t`, the recipients in the header, no From:, Date: or Message-ID:.
    let (code, out) = sendmail_as(
        &sendmail,
        &["-t"],
        b"To: u1@d.test\nBcc: u2@d.test\nSubject: cron-e2e\n\nhello from cron\n",
        &policy,
    );
    assert_eq!(code, 0, "{out}");
    wait_for(
        Duration::from_secs(20),
        "the cron mail in mail/u1 and mail/u2",
        || {
            maildir(&t.join("mail/u1")).iter().any(|m| m.contains("cron-e2e"))
                && maildir(&t.join("mail/u2")).iter().any(|m| m.contains("cron-e2e"))
        },
        || d.log(),
    );
    let m = maildir(&t.join("mail/u1")).into_iter().find(|m| m.contains("cron-e2e")).unwrap_or_default();
    let user =
        String::from_utf8_lossy(&Command::new("id").arg("-un").output().expect("id -un").stdout).trim().to_string();
    assert!(m.contains(&format!("X-Local-User: {user}")), "the policy saw the local user {user}: {m}");
    assert!(m.contains("From: ") && m.contains("Date: ") && m.contains("Message-ID: "), "{m}");
    assert!(!m.contains("Bcc:"), "Bcc: is removed with -t: {m}");
    assert!(m.contains("hello from cron"), "{m}");

    // Recipients as arguments, -f, and -i: a line with a single dot is part of the message.
    let (code, out) = sendmail_as(
        &sendmail,
        &["-i", "-f", "app@s.test", "u3@d.test"],
        b"Subject: dot-e2e\n\n.\nafter the dot\n",
        &policy,
    );
    assert_eq!(code, 0, "{out}");
    wait_for(
        Duration::from_secs(20),
        "the -i mail in mail/u3",
        || maildir(&t.join("mail/u3")).iter().any(|m| m.contains("after the dot")),
        || d.log(),
    );
    let m = maildir(&t.join("mail/u3")).into_iter().find(|m| m.contains("dot-e2e")).unwrap_or_default();
    assert!(m.contains("Return-Path: <app@s.test>"), "-f sets the envelope sender: {m}");
    // Without -i the dot ends the message.
    let (code, out) =
        sendmail_as(MAILC.as_ref(), &["sendmail", "u4@d.test"], b"Subject: nodot-e2e\n\nbefore\n.\nnever\n", &policy);
    assert_eq!(code, 0, "{out}");
    wait_for(
        Duration::from_secs(20),
        "the dot-terminated mail in mail/u4",
        || maildir(&t.join("mail/u4")).iter().any(|m| m.contains("nodot-e2e")),
        || d.log(),
    );
    let m = maildir(&t.join("mail/u4")).into_iter().find(|m| m.contains("nodot-e2e")).unwrap_or_default();
    assert!(m.contains("before") && !m.contains("never"), "{m}");

    // The policy's refusal of a local recipient comes back as a DSN to the submitter.
    let (code, out) = sendmail_as(
        &sendmail,
        &["-f", "u5@d.test", "blocked@d.test", "u6@d.test"],
        b"Subject: refused-e2e\n\nx\n",
        &policy,
    );
    assert_eq!(code, 0, "{out}");
    wait_for(
        Duration::from_secs(20),
        "the DSN in mail/u5 and the mail in mail/u6",
        || {
            maildir(&t.join("mail/u5")).iter().any(|m| m.contains("Blocked by rule for blocked@d.test"))
                && maildir(&t.join("mail/u6")).iter().any(|m| m.contains("refused-e2e"))
        },
        || d.log(),
    );
    assert!(d.log().contains("event=pickup") || d.log().contains("pickup"), "{}", d.log());
    // Postfix's pickup line for each submission: `QUEUEID: uid=N from=<SENDER>`.
    let uid = String::from_utf8_lossy(&Command::new("id").arg("-u").output().expect("id -u").stdout).trim().to_string();
    assert!(
        d.log()
            .lines()
            .any(|l| l.contains(" mailpolicy/pickup[") && l.ends_with(&format!(": uid={uid} from=<app@s.test>"))),
        "{}",
        d.log()
    );

    // -bs: an SMTP session on standard input and output; the message goes the same way.
    let conversation = b"EHLO me\r\nMAIL FROM:<bs@s.test>\r\nRCPT TO:<u7@d.test>\r\nDATA\r\nSubject: bs-e2e\r\n\r\nover stdio\r\n.\r\nQUIT\r\n";
    let (code, out) = sendmail_as(&sendmail, &["-bs"], conversation, &policy);
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("220 ") && out.contains("250 2.0.0") && out.contains("221 "), "{out}");
    wait_for(
        Duration::from_secs(20),
        "the -bs mail in mail/u7",
        || maildir(&t.join("mail/u7")).iter().any(|m| m.contains("bs-e2e") && m.contains("Return-Path: <bs@s.test>")),
        || d.log(),
    );

    // sysexits: no recipients, a bad address.
    let (code, out) = sendmail_as(&sendmail, &[], b"Subject: x\n\nx\n", &policy);
    assert_eq!(code, 64, "{out}");
    let (code, out) = sendmail_as(&sendmail, &["a@@b"], b"Subject: x\n\nx\n", &policy);
    assert_eq!(code, 67, "{out}");
    let (code, out) = sendmail_as(&sendmail, &["-t"], b"Subject: no one\n\nx\n", &policy);
    assert_eq!(code, 65, "{out}");
    // newaliases means nothing to rebuild.
    let (code, out) = sendmail_as(&link_as(t.path(), "newaliases"), &[], b"", &policy);
    assert_eq!(code, 0, "{out}");
    wait_for(Duration::from_secs(20), "an empty queue", || spool_messages(&d.spool()).is_empty(), || d.log());
}

#[test]
fn mail_submitted_while_the_daemon_is_down_is_delivered_when_it_starts() {
    let t = TempDir::new("maildrop");
    let (port, relay) = (free_port(), free_port());
    let policy = t.join("policy.mailpolicy");
    std::fs::write(&policy, local_policy(port, relay)).expect("write policy");
    let sendmail = link_as(t.path(), "sendmail");
    let (code, out) = sendmail_as(&sendmail, &["u1@d.test"], b"Subject: while-down\n\nqueued offline\n", &policy);
    assert_eq!(code, 0, "{out}");
    let drop_dir = t.join("spool/maildrop");
    assert_eq!(std::fs::read_dir(&drop_dir).map(|r| r.count()).unwrap_or(0), 1, "one file in the maildrop");
    // Something that is not a maildrop file is set aside, not retried for ever.
    std::fs::write(drop_dir.join("0000-garbage"), b"hello").expect("write garbage");
    let d = Daemon::start(t.path(), &local_policy(port, relay), &[port]);
    wait_for(
        Duration::from_secs(20),
        "the offline mail in mail/u1",
        || maildir(&t.join("mail/u1")).iter().any(|m| m.contains("queued offline")),
        || d.log(),
    );
    wait_for(
        Duration::from_secs(10),
        "an empty maildrop",
        || std::fs::read_dir(&drop_dir).map(|r| r.count()).unwrap_or(1) == 0,
        || d.log(),
    );
    assert!(t.join("spool/corrupt/maildrop-0000-garbage").exists(), "{}", d.log());

    // mailq (argv[0]) lists what waits: a message for a relay that is down.
    let (code, out) = sendmail_as(&sendmail, &["far@elsewhere.test"], b"Subject: waits\n\nx\n", &policy);
    assert_eq!(code, 0, "{out}");
    let mailq = link_as(t.path(), "mailq");
    wait_for(
        Duration::from_secs(20),
        "mailq shows the deferred message",
        || sendmail_as(&mailq, &[], b"", &policy).1.contains("far@elsewhere.test"),
        || format!("{}\n{}", sendmail_as(&mailq, &[], b"", &policy).1, d.log()),
    );

    // Any local user may list the queue, as with Postfix, although its directories are
    // the daemon's alone: mailq asks the daemon's public listing socket.
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        use std::os::unix::process::CommandExt;
        let spool = t.join("spool");
        let as_nobody = |json: bool| {
            let mut c = Command::new(&mailq);
            c.args(["--spool", &spool.display().to_string()]).uid(65534).gid(65534);
            if json {
                c.arg("--json");
            }
            let out = c.output().expect("mailq as nobody");
            (
                out.status.code(),
                String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
            )
        };
        // nobody cannot read the queue's files itself (mode 0700, the daemon's).
        let deferred = std::fs::metadata(spool.join("deferred"))
            .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()));
        assert_eq!(deferred.map(|m| m & 0o077).ok(), Some(0), "the deferred queue is readable by others");
        let (code, out) = as_nobody(false);
        assert_eq!(code, Some(0), "{out}");
        assert!(out.contains("far@elsewhere.test") && out.contains("Request"), "{out}");
        let (code, out) = as_nobody(true);
        assert_eq!(code, Some(0), "{out}");
        assert!(out.contains("\"address\": \"far@elsewhere.test\""), "{out}");
        // The socket only lists: nothing a user writes to it changes the queue.
        let sock = spool.join("public/showq");
        let mode = std::fs::metadata(&sock).map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()));
        assert_eq!(mode.map(|m| m & 0o777).ok(), Some(0o666), "{}", sock.display());
        let (code, out) = {
            let out = Command::new(MAILC)
                .args(["queue", "flush", "--spool", &spool.display().to_string()])
                .uid(65534)
                .gid(65534)
                .output()
                .expect("queue flush as nobody");
            (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
        };
        assert_ne!(code, Some(0), "nobody flushed the queue: {out}");
    }
}

#[test]
fn git_send_email_submits_through_sendmail() {
    need("/usr/lib/git-core/git-send-email", "git-email");
    let t = TempDir::new("gitsend");
    let (port, relay) = (free_port(), free_port());
    let d = Daemon::start(t.path(), &local_policy(port, relay), &[port]);
    let sendmail = link_as(t.path(), "sendmail");
    let repo = t.join("repo");
    std::fs::create_dir_all(&repo).expect("repo dir");
    let git = |args: &[&str]| {
        let (st, out, err) = run_bounded(
            Command::new("git")
                .args(args)
                .current_dir(&repo)
                .env("GIT_AUTHOR_NAME", "Dev")
                .env("GIT_AUTHOR_EMAIL", "dev@s.test")
                .env("GIT_COMMITTER_NAME", "Dev")
                .env("GIT_COMMITTER_EMAIL", "dev@s.test")
                .env("HOME", t.path())
                .env("MAILPOLICY_POLICY", t.join("policy.mailpolicy")),
            Duration::from_secs(60),
        );
        assert!(st.success(), "git {args:?}: {out}{err}");
        out
    };
    git(&["init", "-q"]);
    std::fs::write(repo.join("a.txt"), "one\n").expect("file");
    git(&["add", "a.txt"]);
    git(&["commit", "-q", "-m", "first"]);
    std::fs::write(repo.join("a.txt"), "two\n").expect("file");
    git(&["commit", "-q", "-am", "patch-e2e: change a"]);
    let server = format!("--smtp-server={}", sendmail.display());
    git(&[
        "send-email",
        "--confirm=never",
        "--suppress-cc=all",
        "--to=u1@d.test",
        "--from=Dev <dev@s.test>",
        &server,
        "-1",
    ]);
    wait_for(
        Duration::from_secs(30),
        "the patch in mail/u1",
        || maildir(&t.join("mail/u1")).iter().any(|m| m.contains("patch-e2e: change a") && m.contains("+two")),
        || d.log(),
    );
}

/// `mailc table query`: what a table gives a key, as the daemon reads it (postmap -q).
#[test]
fn table_query_answers_as_the_daemon_reads_the_table() {
    let t = TempDir::new("tablequery");
    std::fs::write(t.join("virtual"), "info@v.test alice@d.test\n@v.test postmaster@d.test\n").expect("table");
    std::fs::write(t.join("nets.cidr"), "192.0.2.0/24 OK\n").expect("table");
    let policy = t.join("p.mailpolicy");
    std::fs::write(
        &policy,
        "table virtual = map \"virtual\";\ntable nets = cidr \"nets.cidr\";\non rcpt {\n  if recipient in virtual { log \"virtual\"; }\n  if client.ip in nets { log \"net\"; }\n}\n",
    )
    .expect("policy");
    let q = |args: &[&str]| {
        let (st, out, err) = run_bounded(
            Command::new(MAILC).args(["table", "query", "--policy"]).arg(&policy).args(args),
            Duration::from_secs(30),
        );
        (st.code().unwrap_or(-1), out, err)
    };
    let (code, out, err) = q(&["virtual", "info@v.test"]);
    assert_eq!((code, out.as_str()), (0, "alice@d.test\n"), "{err}");
    let (code, out, err) = q(&["virtual", "info@v.test", "nobody@elsewhere.test"]);
    assert_eq!((code, out.as_str()), (1, "alice@d.test\n"), "{err}");
    let (code, out, err) = q(&["nets", "192.0.2.77"]);
    assert_eq!((code, out.as_str()), (0, "OK\n"), "{err}");
    let (code, _, err) = q(&["nosuch", "x"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("no table `nosuch`"), "{err}");
}

/// `sendmail` only compiles the policy: one the open-relay proof refuses (the daemon will
/// not run it) still takes a submission into the maildrop, kept until the daemon runs a
/// mended policy; one that does not compile is refused with EX_CONFIG.
#[test]
fn sendmail_compiles_the_policy_without_proving_it() {
    let t = TempDir::new("sendmail-unproven");
    let sendmail = link_as(t.path(), "sendmail");
    let policy = t.join("policy.mailpolicy");
    std::fs::write(&policy, "server { spool \"spool\"; }\non rcpt { accept; }\n").expect("policy");
    let check = Command::new(MAILC).arg("check").arg(&policy).output().expect("mailc check");
    assert!(!check.status.success(), "the proof refuses an open relay");
    let (code, out) = sendmail_as(&sendmail, &["u1@d.test"], b"Subject: kept\n\nkept\n", &policy);
    assert_eq!(code, 0, "{out}");
    let dropped = std::fs::read_dir(t.join("spool/maildrop")).map(|d| d.count()).unwrap_or(0);
    assert_eq!(dropped, 1, "the submission waits in the maildrop");
    std::fs::write(&policy, "server { spool \"spool\"; }\non rcpt { accept \n").expect("policy");
    let (code, out) = sendmail_as(&sendmail, &["u1@d.test"], b"Subject: no\n\nno\n", &policy);
    assert_eq!(code, 78, "{out}");
}
