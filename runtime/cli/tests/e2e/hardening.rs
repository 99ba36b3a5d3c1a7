//! Issue 10: hardening (client data in paths, long lines, free space, slow clients, AUTH throttles, large messages).

use super::*;

// ================================================================== issue 10: hardening

/// Issue 10.1: a Maildir or mbox path built from the recipient stays under the directory
/// its literal prefix names: `..` and `/` in the local part are escaped into one path
/// component, and a symbolic link below the root is never followed (the delivery fails
/// with a 5.7.1 bounce and a log line, and nothing is written outside).
#[test]
fn delivery_paths_from_client_data_stay_in_their_directory() {
    let t = TempDir::new("paths");
    let port = free_port();
    let outside = t.join("outside");
    std::fs::create_dir_all(&outside).expect("outside");
    std::fs::create_dir_all(t.join("boxes")).expect("boxes");
    std::os::unix::fs::symlink(&outside, t.join("boxes/evil")).expect("symlink");
    std::os::unix::fs::symlink(&outside, t.join("boxes/evilbox")).expect("symlink");
    let policy = format!(
        "list local = domains [\"d.test\"];\n\
         server {{ hostname \"mx.test\"; spool \"spool\"; maildir \"mail\"; local_domains local; }}\n\
         listener smtp {{ address \"127.0.0.1:{port}\"; tls none; }}\n\
         route {{\n\
           if recipient.local :matches \"*box*\" {{ deliver mbox \"boxes/${{recipient.local}}\"; }}\n\
           deliver maildir \"boxes/${{recipient.local}}/\";\n\
         }}\n"
    );
    let d = Daemon::start(t.path(), &policy, &[port]);
    let mut c = Smtp::connect(port).expect("connect");
    let to = [
        "\"x/../../outside/pwned\"@d.test",
        "\"../../outside/pwnbox\"@d.test",
        "evil@d.test",
        "evilbox@d.test",
        "sender@d.test",
    ];
    let (code, text) = c.send("sender@d.test", &to, b"Subject: escape\r\n\r\nbody\r\n", Way::Data).expect("send");
    assert_eq!(code, 250, "{text}");
    wait_for(
        Duration::from_secs(30),
        "deliveries and the DSN for the two symlinked boxes",
        || spool_messages(&d.spool()).is_empty() && !maildir(&t.join("boxes/sender")).is_empty(),
        || format!("{:?}\n{}", files_under(t.path()), d.log()),
    );
    assert!(files_under(&outside).is_empty(), "nothing written outside: {:?}", files_under(&outside));
    let inside = files_under(&t.join("boxes"));
    // The quoted local part (quotes included) is one escaped component of boxes/.
    assert!(inside.iter().any(|f| f.starts_with("_x_.._.._outside_pwned_/new/")), "{inside:?}");
    assert!(inside.iter().any(|f| f == "_.._.._outside_pwnbox_"), "{inside:?}");
    let dsn = maildir(&t.join("boxes/sender")).join("\n");
    assert!(dsn.contains("evil@d.test") && dsn.contains("evilbox@d.test") && dsn.contains("5.7.1"), "{dsn}");
    let log = d.log();
    assert!(log.contains("symbolic link"), "a log line names the refusal:\n{log}");
}

/// Issue 10.5: a body line over 998 octets is accepted; a Maildir keeps it whole, the SMTP
/// next hop gets it folded by CRLF SPACE into lines of at most 998 octets.
#[test]
fn long_lines_are_accepted_and_passed_on() {
    let t = TempDir::new("longline");
    let (port, sport) = (free_port(), free_port());
    let sink = Sink::start(&t.join("sink"), sport, &[]);
    let d = Daemon::start(t.path(), &base_policy(port, sport, "none"), &[port]);
    let long = "x".repeat(5000);
    let msg = format!("Subject: long-line-e2e\r\n\r\n{long}\r\nend\r\n");
    let mut c = Smtp::connect(port).expect("connect");
    let (code, text) = c.send("a@s.test", &["u@d.test", "far@far.test"], msg.as_bytes(), Way::Data).expect("send");
    assert_eq!(code, 250, "{text}");
    wait_for(
        Duration::from_secs(30),
        "the Maildir copy and the relayed one",
        || maildir(&t.join("mail/u")).len() == 1 && sink.messages().iter().any(|m| m.contains("long-line-e2e")),
        || d.log(),
    );
    assert!(maildir(&t.join("mail/u"))[0].contains(&long), "the Maildir keeps the line whole");
    let relayed = sink.messages().into_iter().find(|m| m.contains("long-line-e2e")).expect("relayed");
    assert!(!relayed.contains(&long));
    assert!(relayed.lines().all(|l| l.trim_end_matches('\r').len() <= 998), "folded on the way out");
    let joined: String = relayed.replace("\r\n ", "").replace("\n ", "");
    assert!(joined.contains(&long), "unfolding gives the line back");
}

/// Issue 10.4: free space is checked at MAIL against the spool's real file system: with
/// `queue_minfree` above what is free MAIL gets 452 4.3.1 before any upload; with it within
/// reach, a SIZE that does not fit gets 452 4.3.1 and one that fits is accepted.
#[test]
fn free_space_is_checked_at_mail_with_size() {
    let t = TempDir::new("minfree");
    std::fs::create_dir_all(t.join("spool")).expect("spool");
    let free = {
        let out = Command::new("df").args(["-B1", "--output=avail"]).arg(t.join("spool")).output().expect("df");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(1)
            .and_then(|l| l.trim().parse::<u64>().ok())
            .expect("df avail")
    };
    let policy_for = |port: u16, minfree: u64| {
        format!(
            "list local = domains [\"d.test\"];\n\
             server {{ hostname \"mx.test\"; spool \"spool\"; maildir \"mail\"; local_domains local; queue_minfree {minfree}; max_message_size {max}; }}\n\
             listener smtp {{ address \"127.0.0.1:{port}\"; tls none; }}\nroute {{ deliver maildir; }}\n",
            max = free.saturating_mul(4)
        )
    };
    // queue_minfree twice what is free: every MAIL is refused.
    let port = free_port();
    let d = Daemon::start(t.path(), &policy_for(port, free.saturating_mul(2)), &[port]);
    let mut c = Smtp::connect(port).expect("connect");
    let (code, text) = c.cmd("MAIL FROM:<a@d.test>").expect("mail");
    assert!(code == 452 && text.contains("4.3.1"), "{text}");
    drop(c);
    drop(d);
    // queue_minfree half of what is free: a SIZE of everything that is free does not fit,
    // a small one does.
    let t2 = TempDir::new("minfree2");
    let port = free_port();
    let _d = Daemon::start(t2.path(), &policy_for(port, free / 2), &[port]);
    let mut c = Smtp::connect(port).expect("connect");
    let (code, text) = c.cmd(&format!("MAIL FROM:<a@d.test> SIZE={free}")).expect("mail");
    assert!(code == 452 && text.contains("4.3.1"), "{text}");
    assert_eq!(c.cmd("RSET").expect("rset").0, 250);
    assert_eq!(c.cmd("MAIL FROM:<a@d.test> SIZE=1000").expect("mail").0, 250);
}

/// Issue 10.3: 200 connections from one address that drip a byte every two seconds cannot
/// lock others out: the per-client limit (50) leaves the other slots free, a client from
/// another loopback address gets through at once, and with most slots taken the time-outs
/// shrink so the drippers are cut off by the per-request deadline, not after five minutes.
#[test]
fn slow_clients_cannot_lock_others_out() {
    let t = TempDir::new("slow");
    let port = free_port();
    let dns = Unbound::start(&["."], &[], &[]);
    let policy = format!(
        "list local = domains [\"d.test\"];\n\
         server {{ hostname \"mx.test\"; spool \"spool\"; maildir \"mail\"; local_domains local; max_sessions 60; dns_server \"127.0.0.1:{}\"; dns_timeout 2s; }}\n\
         listener smtp {{ address \"0.0.0.0:{port}\"; tls none; }}\nroute {{ deliver maildir; }}\n",
        dns.port
    );
    let d = Daemon::start(t.path(), &policy, &[port]);
    let mut drippers = Vec::new();
    let mut refused = 0;
    for _ in 0..200 {
        let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let mut r = BufReader::new(s.try_clone().expect("clone"));
        let mut banner = String::new();
        let _ = r.read_line(&mut banner);
        if banner.starts_with("220") {
            drippers.push(s);
        } else {
            assert!(banner.starts_with("421 4.7.0"), "{banner}");
            refused += 1;
        }
    }
    assert_eq!((drippers.len(), refused), (50, 150), "the per-client limit is 50\n{}", d.log());
    for s in &mut drippers {
        let _ = s.write_all(b"E");
    }
    // A normal client from another address (swaks binds 127.0.0.2), while the others drip.
    let start = Instant::now();
    let out = swaks(
        port,
        &["--local-interface", "127.0.0.2", "--from", "a@d.test", "--to", "u@d.test", "--header", "Subject: through"],
    );
    let took = start.elapsed();
    assert!(out.contains("Queued as"), "{out}\n{}", d.log());
    eprintln!("the other client's whole transaction took {took:?}");
    // The drippers: one byte every two seconds; the server cuts them off by the deadline.
    let dripping = Instant::now();
    while dripping.elapsed() < Duration::from_secs(40) && d.log().matches("request deadline").count() < 50 {
        for s in &mut drippers {
            let _ = s.write_all(b"H");
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    let cut = d.log().matches("request deadline").count();
    assert_eq!(cut, 50, "every dripping session ends at its per-request deadline\n{}", d.log());
    assert!(d.log().contains("stress=yes"), "most slots were taken: stress time-outs\n{}", d.log());
}

/// Issue 10.6: failed AUTHs are throttled per login too: a guessing attack spread over
/// many addresses (one failure each, never the per-address limit) gets the login refused
/// with 454 4.7.0 from new addresses, even with the right password, while the user's own
/// address, where the login succeeded before, still gets in.
#[test]
fn auth_failures_are_throttled_per_login_without_locking_out_its_owner() {
    let t = TempDir::new("auth-login");
    let port = free_port();
    let mut c =
        Command::new(MAILC).arg("hash-password").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().expect("hash");
    c.stdin.take().expect("stdin").write_all(b"alice-secret\n").expect("write");
    let out = c.wait_with_output().expect("hash-password");
    std::fs::write(t.join("logins"), format!("alice {}\n", String::from_utf8_lossy(&out.stdout).trim()))
        .expect("logins");
    let policy = format!(
        "list local = domains [\"d.test\"];\ntable logins = map \"logins\";\n\
         server {{ hostname \"mx.test\"; spool \"spool\"; maildir \"mail\"; local_domains local; }}\n\
         listener submission {{ address \"0.0.0.0:{port}\"; protocol submission; tls starttls; auth required; auth_mechanisms [\"PLAIN\"]; credentials logins; }}\n\
         route {{ deliver maildir; }}\n"
    );
    let d = Daemon::start(t.path(), &policy, &[port]);
    let auth = |from: &str, pw: &str| {
        swaks(
            port,
            &[
                "--local-interface",
                from,
                "--tls",
                "--auth",
                "PLAIN",
                "--auth-user",
                "alice",
                "--auth-password",
                pw,
                "--quit-after",
                "AUTH",
            ],
        )
    };
    // The owner logs in from 127.0.0.1 before the attack.
    let out = auth("127.0.0.1", "alice-secret");
    assert!(out.contains("235 "), "{out}");
    // Twelve guesses from twelve addresses.
    for i in 2..14 {
        let out = auth(&format!("127.0.0.{i}"), &format!("guess-{i}"));
        assert!(out.contains("535 ") || out.contains("454 "), "{out}");
    }
    // The right password from a new address is refused now; from the owner's address it works.
    let out = auth("127.0.0.30", "alice-secret");
    assert!(out.contains("454 4.7.0"), "a new address is throttled for this login:\n{out}\n{}", d.log());
    let out = auth("127.0.0.1", "alice-secret");
    assert!(out.contains("235 "), "the owner's address is not locked out:\n{out}\n{}", d.log());
    assert!(d.log().contains("throttled=login"), "{}", d.log());
}

/// Issue 10.2: a message larger than the in-memory bound streams to the spool as it
/// arrives (DATA and BDAT alike) and is delivered byte for byte; header edits and body
/// tests on its first part still apply, and no spill file is left behind.
#[test]
fn large_messages_stream_to_the_spool_intact() {
    let t = TempDir::new("stream");
    let port = free_port();
    let policy = format!(
        "list local = domains [\"d.test\"];\n\
         server {{ hostname \"mx.test\"; spool \"spool\"; maildir \"mail\"; local_domains local; }}\n\
         listener smtp {{ address \"127.0.0.1:{port}\"; tls none; }}\n\
         on data {{ if body :contains \"FORBIDDEN-EARLY\" {{ reject 550 5.7.1 \"no\"; }} header add \"X-Size\" \"${{message.size}}\"; header remove \"X-Drop\"; }}\n\
         route {{ deliver maildir; }}\n"
    );
    let d = Daemon::start(t.path(), &policy, &[port]);
    let mut body = Vec::new();
    let mut i = 0u64;
    while body.len() < 6 << 20 {
        body.extend_from_slice(
            format!("line {i:08} of a large message, 0123456789abcdefghijklmnopqrstuvwxyz\r\n").as_bytes(),
        );
        i += 1;
    }
    let mut msg = b"Subject: big\r\nX-Drop: yes\r\n\r\n".to_vec();
    msg.extend_from_slice(&body);
    for (n, way) in [Way::Data, Way::Bdat].into_iter().enumerate() {
        let mut c = Smtp::connect(port).expect("connect");
        let to = format!("big{n}@d.test");
        let (code, text) = c.send("a@d.test", &[&to], &msg, way).expect("send");
        assert_eq!(code, 250, "{way:?}: {text}");
        let _ = c.cmd("QUIT");
    }
    let mut bad = b"Subject: early\r\n\r\nFORBIDDEN-EARLY\r\n".to_vec();
    bad.extend_from_slice(&body);
    let mut c = Smtp::connect(port).expect("connect");
    assert_eq!(c.send("a@d.test", &["big9@d.test"], &bad, Way::Data).expect("send").0, 550);
    wait_for(
        Duration::from_secs(60),
        "both delivered",
        || {
            (0..2).all(|n| maildir_bytes(&t.join(&format!("mail/big{n}"))).len() == 1)
                && spool_messages(&d.spool()).is_empty()
        },
        || d.log(),
    );
    for n in 0..2 {
        let got = maildir_bytes(&t.join(&format!("mail/big{n}"))).remove(0);
        check_delivered(&got, &msg, &["Return-Path", "Delivered-To", "Received", "X-Size"], &["X-Drop"])
            .expect("intact");
        let text = String::from_utf8_lossy(&got[..400]).into_owned();
        assert!(text.contains(&format!("X-Size: {}", msg.len())), "message.size counts every byte: {text}");
    }
    assert!(files_under(&d.spool()).iter().all(|f| !f.contains("spill")), "{:?}", files_under(&d.spool()));
}
