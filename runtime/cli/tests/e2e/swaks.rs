//! swaks as the client: plain delivery, STARTTLS, AUTH, refused logins, pipelining.

use super::*;

// ================================================================== 1. swaks as client

#[test]
fn swaks_plain_delivery_to_maildir_and_policy_reject() {
    let t = TempDir::new("plain");
    let port = free_port();
    let d = Daemon::start(t.path(), &base_policy(port, free_port(), "none"), &[port]);

    let out = swaks(port, &["--from", "a@s.test", "--to", "u1@d.test", "--header", "Subject: plain-e2e"]);
    assert!(out.contains("250 2.0.0 Queued as"), "{out}");
    wait_for(
        Duration::from_secs(20),
        "the message in mail/u1",
        || maildir(&t.join("mail/u1")).iter().any(|m| m.contains("Subject: plain-e2e")),
        || d.log(),
    );
    let m = maildir(&t.join("mail/u1")).into_iter().find(|m| m.contains("plain-e2e")).unwrap_or_default();
    assert!(m.contains("Return-Path: <a@s.test>") || m.contains("Received: from client.test"), "{m}");

    // the policy's reject reaches the client with the rule's own reply
    let out = swaks(port, &["--from", "a@s.test", "--to", "blocked@d.test"]);
    assert!(out.contains("550 5.7.1 Blocked by rule for blocked@d.test"), "{out}");
    assert!(!out.contains("Queued as"), "{out}");
    assert!(d.log().contains("reject 550 5.7.1 Blocked by rule"), "{}", d.log());
    wait_for(Duration::from_secs(20), "an empty queue", || spool_messages(&d.spool()).is_empty(), || d.log());
}

#[test]
fn swaks_starttls() {
    let t = TempDir::new("starttls");
    let port = free_port();
    let d = Daemon::start(t.path(), &base_policy(port, free_port(), "starttls"), &[port]);
    let out = swaks(port, &["-tls", "--from", "a@s.test", "--to", "u1@d.test", "--header", "Subject: tls-e2e"]);
    assert!(out.contains("STARTTLS"), "{out}");
    assert!(out.contains("220 2.0.0") || out.contains("<-  220"), "{out}");
    assert!(out.contains("TLS started"), "{out}");
    assert!(out.contains("250 2.0.0 Queued as"), "{out}");
    wait_for(
        Duration::from_secs(20),
        "the message in mail/u1",
        || maildir(&t.join("mail/u1")).iter().any(|m| m.contains("Subject: tls-e2e")),
        || d.log(),
    );
    assert!(d.log().contains("starttls session="), "{}", d.log());
    let m = maildir(&t.join("mail/u1")).into_iter().find(|m| m.contains("tls-e2e")).unwrap_or_default();
    assert!(m.contains("ESMTPS"), "Received: says the session was encrypted: {m}");
}

#[test]
fn swaks_auth_plain_and_login_on_submission() {
    let t = TempDir::new("auth");
    let (sub, loop_, smtps) = (free_port(), free_port(), free_port());
    let hash = |pw: &str| {
        let mut c = Command::new(MAILC)
            .arg("hash-password")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("mailc hash-password");
        c.stdin.take().expect("stdin").write_all(format!("{pw}\n").as_bytes()).expect("write");
        let out = c.wait_with_output().expect("hash-password");
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    std::fs::write(t.join("logins"), format!("alice {}\nbob {}\n", hash("alice-secret"), hash("bob secret")))
        .expect("logins");
    let policy = format!(
        r#"list local = domains ["d.test"];
table logins = map "logins";

server {{
  hostname "mx.test";
  spool "spool";
  maildir "mail";
  local_domains local;
}}

listener submission {{
  address "127.0.0.1:{sub}";
  protocol submission;
  tls starttls;
  auth required;
  auth_mechanisms ["PLAIN", "LOGIN"];
  credentials logins;
}}

listener smtps {{
  address "127.0.0.1:{smtps}";
  protocol submissions;
  auth required;
  credentials logins;
}}

listener loopauth {{
  address "127.0.0.1:{loop_}";
  protocol submission;
  tls starttls;
  auth required;
  auth_without_tls true;
  credentials logins;
}}

route {{
  deliver maildir;
}}
"#
    );
    let d = Daemon::start(t.path(), &policy, &[sub, loop_, smtps]);

    // no AUTH before STARTTLS on the submission listener
    let out = swaks(sub, &["--quit-after", "EHLO"]);
    assert!(!out.contains("AUTH"), "AUTH offered before TLS: {out}");
    let out = swaks(sub, &["--from", "alice@d.test", "--to", "u1@d.test", "--quit-after", "RCPT"]);
    assert!(out.contains("<** 530"), "MAIL without AUTH: {out}");
    // after STARTTLS it is offered
    let out = swaks(sub, &["-tls", "--quit-after", "EHLO"]);
    assert!(out.contains("AUTH PLAIN LOGIN"), "{out}");

    for (mech, user, pw) in [("PLAIN", "alice", "alice-secret"), ("LOGIN", "bob", "bob secret")] {
        let out = swaks(
            sub,
            &[
                "-tls",
                "--auth",
                mech,
                "--auth-user",
                user,
                "--auth-password",
                pw,
                "--from",
                "alice@d.test",
                "--to",
                "u1@d.test",
                "--header",
                &format!("Subject: auth-{mech}"),
            ],
        );
        assert!(out.contains("235 2.7.0"), "{mech}: {out}");
        assert!(out.contains("250 2.0.0 Queued as"), "{mech}: {out}");
    }
    // a wrong password is 535 and nothing is queued
    let out = swaks(
        sub,
        &[
            "-tls",
            "--auth",
            "PLAIN",
            "--auth-user",
            "alice",
            "--auth-password",
            "wrong",
            "--from",
            "alice@d.test",
            "--to",
            "u1@d.test",
        ],
    );
    assert!(out.contains("535 5.7.8"), "{out}");
    assert!(!out.contains("Queued as"), "{out}");
    let out = swaks(
        sub,
        &[
            "-tls",
            "--auth",
            "LOGIN",
            "--auth-user",
            "nobody",
            "--auth-password",
            "x",
            "--from",
            "alice@d.test",
            "--to",
            "u1@d.test",
        ],
    );
    assert!(out.contains("535 5.7.8"), "{out}");

    // auth_without_tls on a loopback listener: offered and usable in plaintext
    let out = swaks(loop_, &["--quit-after", "EHLO"]);
    assert!(out.contains("AUTH") && out.contains("PLAIN"), "{out}");
    let out = swaks(
        loop_,
        &[
            "--auth",
            "LOGIN",
            "--auth-user",
            "alice",
            "--auth-password",
            "alice-secret",
            "--from",
            "alice@d.test",
            "--to",
            "u1@d.test",
            "--header",
            "Subject: auth-plaintext",
        ],
    );
    assert!(out.contains("235 2.7.0") && out.contains("Queued as"), "{out}");

    // submissions: implicit TLS from the first byte, then AUTH
    let out = swaks(
        smtps,
        &[
            "--tlsc",
            "--auth",
            "PLAIN",
            "--auth-user",
            "alice",
            "--auth-password",
            "alice-secret",
            "--from",
            "alice@d.test",
            "--to",
            "u1@d.test",
            "--header",
            "Subject: auth-implicit-tls",
        ],
    );
    assert!(out.contains("TLS started") && out.contains("235 2.7.0") && out.contains("Queued as"), "{out}");

    wait_for(
        Duration::from_secs(20),
        "four messages in mail/u1",
        || maildir(&t.join("mail/u1")).len() == 4,
        || d.log(),
    );
    let all = maildir(&t.join("mail/u1")).join("\n");
    for s in ["auth-PLAIN", "auth-LOGIN", "auth-plaintext", "auth-implicit-tls"] {
        assert!(all.contains(&format!("Subject: {s}")), "{all}");
    }
    assert!(d.log().contains("auth"), "{}", d.log());
}

/// Issue 9: a login the policy refuses in `on auth` leaves the session as unauthenticated
/// as a wrong password does (no relaying, and `auth required` still refuses MAIL), and the
/// auth stage runs after failed AUTHs too.
#[test]
fn refused_login_does_not_relay() {
    let t = TempDir::new("refused-login");
    let (opt, req) = (free_port(), free_port());
    let hash = |pw: &str| {
        let mut c = Command::new(MAILC)
            .arg("hash-password")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("mailc hash-password");
        c.stdin.take().expect("stdin").write_all(format!("{pw}\n").as_bytes()).expect("write");
        let out = c.wait_with_output().expect("hash-password");
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    std::fs::write(t.join("logins"), format!("alice {}\nmallory {}\n", hash("alice-secret"), hash("mallory-secret")))
        .expect("logins");
    let policy = format!(
        r#"list local = domains ["d.test"];
list disabled = strings ["mallory"];
list nobody = cidr ["192.0.2.0/24"];
table logins = map "logins";

server {{
  hostname "mx.test";
  spool "spool";
  maildir "mail";
  local_domains local;
  networks nobody;
}}

listener optional {{
  address "127.0.0.1:{opt}";
  protocol submission;
  auth optional;
  auth_without_tls true;
  auth_mechanisms ["PLAIN", "LOGIN"];
  credentials logins;
}}

listener required {{
  address "127.0.0.1:{req}";
  protocol submission;
  auth required;
  auth_without_tls true;
  auth_mechanisms ["PLAIN", "LOGIN"];
  credentials logins;
}}

on auth {{
  if not authenticated {{
    log "failed login with ${{auth.mechanism}}";
  }}
  if authenticated and auth.user in disabled {{
    reject 535 5.7.8 "Account disabled";
  }}
}}

route {{
  deliver maildir;
}}
"#
    );
    let d = Daemon::start(t.path(), &policy, &[opt, req]);
    let login = |port: u16, user: &str, pw: &str, to: &str| {
        swaks(port, &["--auth", "PLAIN", "--auth-user", user, "--auth-password", pw, "--from", "a@d.test", "--to", to])
    };
    // The refused login: 535 with the policy's text, then no relaying and nothing queued.
    let out = login(opt, "mallory", "mallory-secret", "victim@relay-target.test");
    assert!(out.contains("535 5.7.8 Account disabled"), "{out}");
    let out = swaks(
        opt,
        &[
            "--auth",
            "PLAIN",
            "--auth-user",
            "mallory",
            "--auth-password",
            "mallory-secret",
            "--auth-optional",
            "--from",
            "a@d.test",
            "--to",
            "victim@relay-target.test",
        ],
    );
    assert!(out.contains("554 5.7.1 Relay access denied"), "a refused login relayed: {out}");
    assert!(!out.contains("Queued as"), "{out}");
    // With `auth required`, a refused login is no login: MAIL is refused.
    let out = swaks(
        req,
        &[
            "--auth",
            "PLAIN",
            "--auth-user",
            "mallory",
            "--auth-password",
            "mallory-secret",
            "--auth-optional",
            "--from",
            "a@d.test",
            "--to",
            "u1@d.test",
        ],
    );
    assert!(out.contains("530 5.7.0 Authentication required"), "{out}");
    assert!(!out.contains("Queued as"), "{out}");
    // A wrong password: the auth stage ran for it (its log line).
    let out = login(opt, "alice", "wrong", "u1@d.test");
    assert!(out.contains("535 5.7.8"), "{out}");
    wait_for(
        Duration::from_secs(10),
        "the failed login's log line",
        || d.log().contains("failed login with PLAIN"),
        || d.log(),
    );
    // The accepted login still relays.
    let out = login(opt, "alice", "alice-secret", "friend@relay-target.test");
    assert!(out.contains("235 2.7.0") && out.contains("Queued as"), "{out}");
}

#[test]
fn swaks_pipelining() {
    let t = TempDir::new("pipeline");
    let port = free_port();
    let d = Daemon::start(t.path(), &base_policy(port, free_port(), "none"), &[port]);
    let out = swaks(
        port,
        &[
            "--pipeline",
            "--from",
            "a@s.test",
            "--to",
            "u1@d.test,blocked@d.test,u2@d.test",
            "--header",
            "Subject: pipelined",
        ],
    );
    assert!(out.contains("PIPELINING"), "{out}");
    // the whole group went out before the first reply came back
    let pos = |s: &str| out.find(s).unwrap_or_else(|| panic!("{s:?} not in {out}"));
    assert!(pos("> DATA") < pos("250 2.1.0 Sender OK"), "not pipelined: {out}");
    assert!(out.contains("550 5.7.1 Blocked by rule for blocked@d.test"), "{out}");
    assert!(out.contains("250 2.0.0 Queued as"), "{out}");
    wait_for(
        Duration::from_secs(20),
        "the message for u1 and u2",
        || maildir(&t.join("mail/u1")).len() == 1 && maildir(&t.join("mail/u2")).len() == 1,
        || d.log(),
    );
    assert!(maildir(&t.join("mail/blocked")).is_empty());
}
