//! Bad input: reloads with broken and good policies, start-up refusals, a corrupt queue file.

use super::*;

// ================================================================== 6. bad input

#[test]
fn sighup_with_a_broken_policy_keeps_the_old_one() {
    let t = TempDir::new("sighup");
    let port = free_port();
    let d = Daemon::start(t.path(), &base_policy(port, free_port(), "none"), &[port]);
    let out = swaks(port, &["--from", "a@s.test", "--to", "blocked@d.test"]);
    assert!(out.contains("550 5.7.1 Blocked by rule for blocked@d.test"), "{out}");
    // the policy file is replaced by one with errors, then SIGHUP
    std::fs::write(
        &d.policy,
        "listener smtp { address \"127.0.0.1:1\"; }\non rcpt { accept_everything; }\nroute { deliver maildir }\n",
    )
    .expect("write");
    d.signal("HUP");
    wait_for(Duration::from_secs(20), "reload-refused in the log", || d.log().contains("reload-refused"), || d.log());
    // still answering per the old policy
    let out = swaks(port, &["--from", "a@s.test", "--to", "blocked@d.test"]);
    assert!(out.contains("550 5.7.1 Blocked by rule for blocked@d.test"), "{out}");
    let out = swaks(port, &["--from", "a@s.test", "--to", "u1@d.test", "--header", "Subject: after-hup"]);
    assert!(out.contains("Queued as"), "{out}");
    wait_for(
        Duration::from_secs(20),
        "delivery after the refused reload",
        || maildir(&t.join("mail/u1")).iter().any(|m| m.contains("Subject: after-hup")),
        || d.log(),
    );
    // a good policy is taken on the next SIGHUP: the reject rule is gone
    std::fs::write(&d.policy, base_policy(port, free_port(), "none").replace("\"blocked\"", "\"refused\""))
        .expect("write");
    d.signal("HUP");
    wait_for(Duration::from_secs(20), "reloaded in the log", || d.log().contains("reloaded"), || d.log());
    let out = swaks(port, &["--from", "a@s.test", "--to", "blocked@d.test"]);
    assert!(out.contains("Queued as"), "{out}");
    let out = swaks(port, &["--from", "a@s.test", "--to", "refused@d.test"]);
    assert!(out.contains("550 5.7.1 Blocked by rule for refused@d.test"), "{out}");
    // SIGTERM: a clean stop
    d.signal("TERM");
    let mut d = d;
    let start = Instant::now();
    let code = loop {
        if let Some(Ok(Some(st))) = d.child.0.as_mut().map(|c| c.try_wait()) {
            break st.code();
        }
        assert!(start.elapsed() < Duration::from_secs(40), "no exit on SIGTERM:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(code, Some(0), "{}", d.log());
    assert!(d.log().contains("stopped"), "{}", d.log());
}

#[test]
fn sighup_with_a_good_policy_keeps_the_queue_going() {
    // The scheduler's queue runs are an hour apart: only its own retries (1s to 2s) can
    // deliver the deferred message, so a reload must not make it forget the queue.
    let t = TempDir::new("sighup-queue");
    let (port, sport) = (free_port(), free_port());
    let sink = Sink::start(&t.join("sink-4xx"), sport, &["-r", "RCPT"]);
    let policy = base_policy(port, sport, "none").replace("queue_run 1s;", "queue_run 1h;");
    let d = Daemon::start(t.path(), &policy, &[port]);
    let out = swaks(port, &["--from", "a@s.test", "--to", "x@far.test", "--header", "Subject: deferred-over-reload"]);
    assert!(out.contains("Queued as"), "{out}");
    wait_for(Duration::from_secs(30), "a deferral", || d.log().contains("status=deferred"), || d.log());
    // a valid policy (the same text) is reloaded while the message waits for its retry
    d.signal("HUP");
    wait_for(Duration::from_secs(20), "reloaded in the log", || d.log().contains("reloaded"), || d.log());
    drop(sink);
    let good = Sink::start(&t.join("sink-ok"), sport, &[]);
    wait_for(
        Duration::from_secs(30),
        "the deferred message delivered after the reload",
        || good.messages().iter().any(|m| m.contains("Subject: deferred-over-reload")),
        || format!("{}\n{}", queue_list(&d.spool()), d.log()),
    );
}

/// B1 + B6: the open-relay proof is part of the check the daemon runs, so an open relay
/// never starts either.
#[test]
fn an_open_relay_policy_does_not_start() {
    let t = TempDir::new("openrelay");
    let port = free_port();
    let policy = t.join("open.mailpolicy");
    // Reachable from outside (a loopback-only listener has no stranger, spec 16.1).
    std::fs::write(&policy, format!("listener smtp {{ address \"0.0.0.0:{port}\"; }}\non rcpt {{ accept; }}\n"))
        .expect("write");
    let (st, out, err) = run_bounded(
        Command::new(MAILC).arg("serve").arg("--policy").arg(&policy).current_dir(t.path()),
        Duration::from_secs(30),
    );
    assert_eq!(st.code(), Some(1), "{out}{err}");
    assert!(err.contains("mailc::open-relay"), "the proof's error is reported: {err}");
    assert!(!listening(port), "nothing listens on {port}");
}

#[test]
fn a_policy_with_errors_does_not_start() {
    let t = TempDir::new("badpolicy");
    let port = free_port();
    let policy = t.join("bad.mailpolicy");
    std::fs::write(
        &policy,
        format!("listener smtp {{ address \"127.0.0.1:{port}\"; }}\non rcpt {{ frobnicate; }}\nroute {{ deliver maildir; }}\n"),
    )
    .expect("write");
    let (st, out, err) = run_bounded(
        Command::new(MAILC).arg("serve").arg("--policy").arg(&policy).current_dir(t.path()),
        Duration::from_secs(30),
    );
    assert_eq!(st.code(), Some(1), "{out}{err}");
    assert!(err.contains("frobnicate"), "the error is reported: {err}");
    assert!(err.contains("not starting"), "{err}");
    assert!(!listening(port), "nothing listens on {port}");
    assert!(!t.join("spool").exists() && !t.join("var").exists(), "no spool made");
}

#[test]
fn a_corrupt_queue_file_moves_to_corrupt_at_start() {
    let t = TempDir::new("corrupt");
    let port = free_port();
    let incoming = t.join("spool/incoming");
    std::fs::create_dir_all(&incoming).expect("mkdir");
    // a header that does not parse, and a message file cut short
    std::fs::write(incoming.join("01A2000000000000000001"), b"MAILPOLICY-SPOOL 1\n{not json\n").expect("write");
    std::fs::write(
        incoming.join("01A2000000000000000002"),
        b"MAILPOLICY-SPOOL 1\n{\"id\":\"01A2000000000000000002\",\"class\":\"normal\",\"arrived_ms\":1,\"data_len\":100",
    )
    .expect("write");
    std::fs::write(incoming.join("garbage"), b"\x00\x01\x02 not a queue file").expect("write");
    let d = Daemon::start(t.path(), &base_policy(port, free_port(), "none"), &[port]);
    let corrupt = files_under(&t.join("spool/corrupt"));
    assert!(corrupt.iter().any(|f| f.contains("01A2000000000000000001")), "{corrupt:?}\n{}", d.log());
    assert!(corrupt.iter().any(|f| f.contains("01A2000000000000000002")), "{corrupt:?}\n{}", d.log());
    assert!(d.log().contains("corrupt file="), "reported: {}", d.log());
    // and the daemon runs
    let out = swaks(port, &["--from", "a@s.test", "--to", "u1@d.test", "--header", "Subject: after-corrupt"]);
    assert!(out.contains("Queued as"), "{out}");
    wait_for(
        Duration::from_secs(20),
        "delivery next to a corrupt file",
        || maildir(&t.join("mail/u1")).iter().any(|m| m.contains("Subject: after-corrupt")),
        || d.log(),
    );
    assert!(queue_list(&d.spool()).contains("corrupt"), "{}", queue_list(&d.spool()));
}

/// A reload applies a listener's settings to the connections accepted after it: a renewed
/// certificate at the same path (certbot's way), a new `proxy_protocol`, a new banner; a
/// listener moved to another address is kept until restart, and the log says so
/// (`reload-partial`).
#[test]
fn a_reload_applies_listener_settings_and_names_what_waits_for_a_restart() {
    let t = TempDir::new("reload-listener");
    let port = free_port();
    let tls = t.join("tls");
    let issue = |name: &str| {
        let dir = t.join(name);
        let (c, k) = mailpolicy_daemon::tls::self_signed(&dir, name).expect("certificate");
        std::fs::create_dir_all(&tls).expect("tls dir");
        std::fs::copy(&c, tls.join("cert.pem")).expect("cert");
        std::fs::copy(&k, tls.join("key.pem")).expect("key");
        std::fs::read_to_string(&c).expect("pem")
    };
    let policy = |extra: &str, address: u16| {
        format!(
            "server {{ hostname \"mx.test\"; spool \"spool\"; }}\n\
             listener smtp {{ address \"127.0.0.1:{address}\"; tls starttls; cert \"tls/cert.pem\"; key \"tls/key.pem\"; {extra} }}\n\
             on mail {{ reject 550 5.7.1 \"you are ${{client.ip}}\"; }}\n"
        )
    };
    // The certificate the server shows over STARTTLS (openssl prints it, PEM).
    let served = || {
        let (_, out, err) = run_bounded(
            Command::new("openssl")
                .args(["s_client", "-starttls", "smtp", "-connect", &format!("127.0.0.1:{port}")])
                .stdin(Stdio::null()),
            Duration::from_secs(30),
        );
        format!("{out}{err}")
    };
    let pem_body = |pem: &str| pem.lines().filter(|l| !l.starts_with("-----")).collect::<String>();
    let first = issue("one.test");
    let d = Daemon::start(t.path(), &policy("", port), &[port]);
    assert!(pem_body(&served()).contains(&pem_body(&first)), "the first certificate is served");
    let talk = |bytes: &[u8]| {
        let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
        let mut r = BufReader::new(s.try_clone().expect("clone"));
        let mut greeting = String::new();
        if !bytes.starts_with(b"PROXY") {
            r.read_line(&mut greeting).expect("greeting");
        }
        s.write_all(bytes).expect("write");
        if bytes.starts_with(b"PROXY") {
            r.read_line(&mut greeting).expect("greeting");
        }
        s.write_all(b"EHLO x\r\nMAIL FROM:<a@b.test>\r\nQUIT\r\n").expect("write");
        let mut all = greeting;
        let _ = std::io::Read::read_to_string(&mut r, &mut all);
        all
    };
    assert!(talk(b"").contains("you are 127.0.0.1"));

    // The certificate renewed in place and a banner added: SIGHUP.
    let second = issue("two.test");
    std::fs::write(&d.policy, policy("banner \"renewed\";", port)).expect("write");
    d.signal("HUP");
    wait_for(Duration::from_secs(20), "reloaded in the log", || d.log().contains("reloaded"), || d.log());
    let now = served();
    assert!(pem_body(&now).contains(&pem_body(&second)), "the renewed certificate is served: {now}\n{}", d.log());
    assert!(talk(b"").starts_with("220 mx.test renewed"));
    // The load balancer added: a PROXY header names the client.
    std::fs::write(&d.policy, policy("banner \"renewed\"; proxy_protocol [\"127.0.0.0/8\"];", port)).expect("write");
    d.signal("HUP");
    wait_for(Duration::from_secs(20), "a second reload", || d.log().matches("reloaded").count() == 2, || d.log());
    let got = talk(b"PROXY TCP4 192.0.2.33 127.0.0.1 4000 25\r\n");
    assert!(got.contains("you are 192.0.2.33"), "{got}\n{}", d.log());
    assert!(!d.log().contains("reload-partial"), "nothing was kept: {}", d.log());

    // Another address for the listener: that waits for a restart, and the log says so;
    // the running listener keeps the settings it has.
    let other = free_port();
    std::fs::write(&d.policy, policy("proxy_protocol [\"127.0.0.0/8\"]; banner \"moved\";", other)).expect("write");
    d.signal("HUP");
    wait_for(Duration::from_secs(20), "reload-partial in the log", || d.log().contains("reload-partial"), || d.log());
    let log = d.log();
    let line = log.lines().find(|l| l.contains("reload-partial")).unwrap_or_default();
    assert!(line.contains(&format!("listener smtp at 127.0.0.1:{port} (not 127.0.0.1:{other})")), "{line}");
    assert!(talk(b"PROXY TCP4 192.0.2.34 127.0.0.1 4000 25\r\n").starts_with("220 mx.test renewed"));

    // A backup setting changed (read at start): named too.
    let backup = policy("proxy_protocol [\"127.0.0.0/8\"];", port)
        .replace("spool \"spool\"; }", "spool \"spool\"; backup_timeout 5s; }");
    std::fs::write(&d.policy, backup).expect("write");
    d.signal("HUP");
    wait_for(
        Duration::from_secs(20),
        "a second reload-partial",
        || d.log().matches("reload-partial").count() == 2,
        || d.log(),
    );
    let log = d.log();
    let line = log.lines().filter(|l| l.contains("reload-partial")).nth(1).unwrap_or_default();
    assert!(line.contains("the backup settings (backup_*)") && !line.contains("listener smtp"), "{line}");
}
