//! Look-ups for real: DNSBL and SPF through unbound, call-ahead, alerts, DKIM signing, idle time-outs, route-stage bcc and archive, smarthost TLS.

use super::*;

// ================================================================== 7. Look-ups for real

/// R19 and R25 through the daemon against a real DNS server: a DNSBL listing refuses the
/// client at connect with the list's TXT text; SPF fail refuses the sender; SPF pass is
/// recorded in an Authentication-Results header of the delivered message.
#[test]
fn dnsbl_and_spf_through_a_real_dns_server() {
    let t = TempDir::new("dns");
    let mut ub = Unbound::start(
        &["test.", "127.in-addr.arpa."],
        &[
            "1.0.0.127.dnsbl.test. A 127.0.0.2",
            "1.0.0.127.dnsbl.test. TXT \"listed for testing\"",
            "good.test. TXT \"v=spf1 ip4:127.0.0.1 -all\"",
            "bad.test. TXT \"v=spf1 ip4:192.0.2.1 -all\"",
        ],
        &[],
    );
    // 1. The DNSBL lists 127.0.0.1: refused at connect.
    let p1 = free_port();
    let listed = format!(
        "require [\"dnsbl\"];\nserver {{ hostname \"mx.test\"; spool \"spool1\"; maildir \"mail\"; dns_server \"127.0.0.1:{dns}\"; }}\n\
         listener smtp {{ address \"127.0.0.1:{p1}\"; tls none; }}\n\
         on connect {{ if dnsbl \"dnsbl.test\" {{ reject 554 5.7.1 \"${{client.ip}} is listed by ${{dnsbl.zone}}: ${{dnsbl.text}}\"; }} }}\n",
        dns = ub.port
    );
    std::fs::create_dir_all(t.join("one")).expect("dir");
    let d1 = Daemon::start(&t.join("one"), &listed, &[p1]);
    let out = swaks(p1, &["--from", "a@good.test", "--to", "x@d.test"]);
    assert!(out.contains("554 5.7.1 127.0.0.1 is listed by dnsbl.test: listed for testing"), "{out}\n{}", d1.log());
    drop(d1);

    // 2. SPF: fail is refused at MAIL, pass is delivered with Authentication-Results.
    let p2 = free_port();
    let spf = format!(
        "require [\"spf\"];\nlist local = domains [\"d.test\"];\n\
         server {{ hostname \"mx.test\"; spool \"spool2\"; maildir \"mail\"; local_domains local; dns_server \"127.0.0.1:{dns}\"; }}\n\
         listener smtp {{ address \"127.0.0.1:{p2}\"; tls none; }}\n\
         on mail {{ if spf :is \"fail\" {{ reject 550 5.7.23 \"SPF fail for ${{sender.domain}}\"; }} }}\n\
         route {{ if recipient.is_local {{ deliver maildir; }} }}\n",
        dns = ub.port
    );
    std::fs::create_dir_all(t.join("two")).expect("dir");
    let d2 = Daemon::start(&t.join("two"), &spf, &[p2]);
    let out = swaks(p2, &["--from", "eve@bad.test", "--to", "x@d.test"]);
    assert!(out.contains("550 5.7.23 SPF fail for bad.test"), "{out}\n{}", d2.log());
    let out = swaks(p2, &["--from", "alice@good.test", "--to", "x@d.test", "--header", "Subject: spf pass"]);
    assert!(out.contains("Queued as"), "{out}\n{}", d2.log());
    wait_for(
        Duration::from_secs(20),
        "the message in mail/x",
        || !maildir(&t.join("two/mail/x")).is_empty(),
        || d2.log(),
    );
    let m = &maildir(&t.join("two/mail/x"))[0];
    assert!(m.contains("Authentication-Results: mx.test;"), "{m}");
    assert!(m.contains("spf=pass"), "{m}");
    ub.stop();
}

/// R27: call-ahead asks the next hop the route stage picks and answers with its reply.
#[test]
fn callahead_mirrors_the_next_hop() {
    let t = TempDir::new("callahead");
    let (port, ok, bad) = (free_port(), free_port(), free_port());
    let sink_ok = Sink::start(&t.join("sink-ok"), ok, &[]);
    let _sink_bad = Sink::start(&t.join("sink-bad"), bad, &["-f", "RCPT"]);
    let policy = format!(
        "require [\"callahead\"];\nlist local = domains [\"ok.test\", \"bad.test\"];\n\
         server {{ hostname \"mx.test\"; spool \"spool\"; maildir \"mail\"; local_domains local; }}\n\
         listener smtp {{ address \"127.0.0.1:{port}\"; tls none; }}\n\
         on rcpt {{ if not callahead {{ reject callahead; }} }}\n\
         route {{\n  if recipient.domain :is \"bad.test\" {{ deliver smtp \"[127.0.0.1]:{bad}\"; }}\n  deliver smtp \"[127.0.0.1]:{ok}\";\n}}\n"
    );
    let d = Daemon::start(t.path(), &policy, &[port]);
    let out = swaks(port, &["--from", "a@s.test", "--to", "nobody@bad.test"]);
    assert!(out.contains("<** 5"), "the next hop's 5xx is mirrored at RCPT: {out}\n{}", d.log());
    let out = swaks(port, &["--from", "a@s.test", "--to", "somebody@ok.test", "--header", "Subject: called ahead"]);
    assert!(out.contains("Queued as"), "{out}\n{}", d.log());
    wait_for(
        Duration::from_secs(20),
        "the message at the accepting sink",
        || sink_ok.messages().iter().any(|m| m.contains("Subject: called ahead")),
        || d.log(),
    );
}

/// R7: `alert` mails the administrator once per window, however often the rule fires.
#[test]
fn alert_mails_the_administrator_once_per_window() {
    let t = TempDir::new("alert");
    let port = free_port();
    let policy = format!(
        "list local = domains [\"d.test\"];\n\
         server {{ hostname \"mx.test\"; spool \"spool\"; maildir \"mail\"; local_domains local; alert_from \"alerts@d.test\"; }}\n\
         listener smtp {{ address \"127.0.0.1:{port}\"; tls none; }}\n\
         on mail {{ if sender.domain :is \"noisy.test\" {{ alert \"admin@d.test\" \"noisy sender ${{sender}}\" :every 1h; }} }}\n\
         route {{ if recipient.is_local {{ deliver maildir; }} }}\n"
    );
    let d = Daemon::start(t.path(), &policy, &[port]);
    for _ in 0..3 {
        let out = swaks(port, &["--from", "x@noisy.test", "--to", "u@d.test"]);
        assert!(out.contains("Queued as"), "{out}");
    }
    wait_for(
        Duration::from_secs(20),
        "an alert in mail/admin",
        || !maildir(&t.join("mail/admin")).is_empty(),
        || d.log(),
    );
    wait_for(Duration::from_secs(20), "three messages in mail/u", || maildir(&t.join("mail/u")).len() == 3, || d.log());
    let alerts = maildir(&t.join("mail/admin"));
    assert_eq!(alerts.len(), 1, "one alert per window: {alerts:?}");
    assert!(alerts[0].contains("Subject: mailpolicy alert: noisy sender x@noisy.test"), "{}", alerts[0]);
    assert!(alerts[0].contains("From: <alerts@d.test>"), "{}", alerts[0]);
}

/// B7: the daemon signs mail from its own users with DKIM (key made by openssl here).
#[test]
fn dkim_signs_mail_from_our_users() {
    let t = TempDir::new("dkim");
    let port = free_port();
    let (st, out, err) = run_bounded(
        Command::new("openssl").args(["genpkey", "-algorithm", "ed25519", "-out"]).arg(t.join("dkim.pem")),
        Duration::from_secs(30),
    );
    assert!(st.success(), "openssl: {out}{err}");
    let policy = format!(
        "list local = domains [\"d.test\"];\nsecret dkim = file \"dkim.pem\";\n\
         server {{ hostname \"mx.test\"; spool \"spool\"; maildir \"mail\"; local_domains local; dkim_key dkim; dkim_selector \"mail\"; dkim_domain \"d.test\"; }}\n\
         listener smtp {{ address \"127.0.0.1:{port}\"; tls none; }}\n\
         route {{ if recipient.is_local {{ deliver maildir; }} }}\n"
    );
    let d = Daemon::start(t.path(), &policy, &[port]);
    // From a local user on a trusted (loopback) client: signed.
    let out = swaks(port, &["--from", "alice@d.test", "--to", "u@d.test", "--header", "Subject: signed"]);
    assert!(out.contains("Queued as"), "{out}");
    // From a foreign domain: not ours to sign.
    let out = swaks(port, &["--from", "eve@other.test", "--to", "u@d.test", "--header", "Subject: unsigned"]);
    assert!(out.contains("Queued as"), "{out}");
    wait_for(Duration::from_secs(20), "two messages in mail/u", || maildir(&t.join("mail/u")).len() == 2, || d.log());
    let msgs = maildir(&t.join("mail/u"));
    let signed = msgs.iter().find(|m| m.contains("Subject: signed")).expect("the signed message");
    assert!(
        signed.contains("DKIM-Signature:")
            && signed.contains("d=d.test")
            && signed.contains("s=mail")
            && signed.contains("a=ed25519-sha256"),
        "{signed}"
    );
    // The signature is on top of the fields the server added (Conn puts it there).
    let at = |f: &str| signed.find(f).unwrap_or(usize::MAX);
    assert!(at("DKIM-Signature:") < at("Received: from"), "{signed}");
    let unsigned = msgs.iter().find(|m| m.contains("Subject: unsigned")).expect("the other message");
    assert!(!unsigned.contains("DKIM-Signature:"), "{unsigned}");
}

/// R46: idle time-outs per phase: `command_timeout` between commands, `data_timeout`
/// inside DATA. (Generous margins: the test checks which time-out applies, not speed.)
#[test]
fn idle_timeouts_per_phase() {
    let t = TempDir::new("timeouts");
    let port = free_port();
    let policy = format!(
        "list local = domains [\"d.test\"];\n\
         server {{ hostname \"mx.test\"; spool \"spool\"; maildir \"mail\"; local_domains local; }}\n\
         listener smtp {{ address \"127.0.0.1:{port}\"; tls none; command_timeout 1s; data_timeout 6s; }}\n\
         route {{ if recipient.is_local {{ deliver maildir; }} }}\n"
    );
    let d = Daemon::start(t.path(), &policy, &[port]);
    let connect = || {
        let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(15))).expect("timeout");
        let r = BufReader::new(s.try_clone().expect("clone"));
        (s, r)
    };
    let reply = |r: &mut BufReader<TcpStream>| -> String {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).unwrap_or(0) == 0 {
                return all;
            }
            all.push_str(&line);
            if line.len() < 4 || line.as_bytes()[3] == b' ' {
                return all;
            }
        }
    };
    // An idle client between commands is dropped after command_timeout.
    let (_s, mut r) = connect();
    assert!(reply(&mut r).starts_with("220"));
    let bye = reply(&mut r);
    assert!(bye.starts_with("421 4.4.2"), "{bye}\n{}", d.log());
    // Inside DATA a pause longer than command_timeout is fine (data_timeout applies).
    let (mut s, mut r) = connect();
    assert!(reply(&mut r).starts_with("220"));
    for (cmd, want) in
        [("EHLO c.test", "250"), ("MAIL FROM:<a@c.test>", "250"), ("RCPT TO:<u@d.test>", "250"), ("DATA", "354")]
    {
        s.write_all(format!("{cmd}\r\n").as_bytes()).expect("write");
        let got = reply(&mut r);
        assert!(got.starts_with(want), "{cmd}: {got}");
    }
    s.write_all(b"Subject: slow\r\n").expect("write");
    std::thread::sleep(Duration::from_secs(3));
    s.write_all(b"\r\nbody\r\n.\r\n").expect("write");
    let got = reply(&mut r);
    assert!(got.starts_with("250"), "a 3 s pause inside DATA is within data_timeout: {got}\n{}", d.log());
}

/// R12: route-stage `bcc` and `archive` make one copy per message, and a copy makes no
/// further copies (a `bcc` every message meets would otherwise copy itself forever).
#[test]
fn route_stage_bcc_and_archive() {
    let t = TempDir::new("copies");
    let port = free_port();
    let policy = format!(
        "list local = domains [\"d.test\"];\n\
         server {{ hostname \"mx.test\"; spool \"spool\"; maildir \"mail\"; local_domains local; }}\n\
         listener smtp {{ address \"127.0.0.1:{port}\"; tls none; }}\n\
         route {{\n  bcc \"audit@d.test\";\n  if recipient.local :is \"u\" {{ archive \"copies\"; }}\n  if recipient.is_local {{ deliver maildir; }}\n}}\n"
    );
    let d = Daemon::start(t.path(), &policy, &[port]);
    let out = swaks(port, &["--from", "a@c.test", "--to", "u@d.test,v@d.test", "--header", "Subject: copied"]);
    assert!(out.contains("Queued as"), "{out}");
    wait_for(
        Duration::from_secs(20),
        "u, v, audit and the archive",
        || {
            maildir(&t.join("mail/u")).len() == 1
                && maildir(&t.join("mail/v")).len() == 1
                && !maildir(&t.join("mail/audit")).is_empty()
                && !maildir(&t.join("mail/copies")).is_empty()
        },
        || d.log(),
    );
    wait_for(Duration::from_secs(20), "an empty queue", || spool_messages(&d.spool()).is_empty(), || d.log());
    assert_eq!(maildir(&t.join("mail/audit")).len(), 1, "one bcc copy per message, and no copy of the copy");
    assert_eq!(maildir(&t.join("mail/copies")).len(), 1, "one archive copy");
    assert!(maildir(&t.join("mail/audit"))[0].contains("Subject: copied"));
}

/// R10/R43: a smarthost whose certificate a private CA signed is trusted with `:ca`; without
/// it, `:tls required` defers (the system's trust store does not know the CA).
#[test]
fn smarthost_tls_required_trusts_a_private_ca() {
    let t = TempDir::new("privca");
    let openssl = |args: &[&str]| {
        let (st, out, err) =
            run_bounded(Command::new("openssl").args(args).current_dir(t.path()), Duration::from_secs(60));
        assert!(st.success(), "openssl {args:?}: {out}{err}");
    };
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=mailpolicy test CA",
    ]);
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "hop.key",
        "-out",
        "hop.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    std::fs::write(t.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").expect("ext file");
    openssl(&[
        "x509",
        "-req",
        "-in",
        "hop.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "hop.pem",
        "-days",
        "2",
        "-extfile",
        "san.ext",
    ]);
    // The next hop: a second daemon with the CA-signed certificate, STARTTLS.
    let (port, hop_port) = (free_port(), free_port());
    let hop_dir = t.join("hop");
    std::fs::create_dir_all(&hop_dir).expect("hop dir");
    let hop_policy = format!(
        "list local = domains [\"far.test\"];\n\
         server {{ hostname \"hop.test\"; spool \"spool\"; maildir \"mail\"; local_domains local; }}\n\
         listener smtp {{ address \"127.0.0.1:{hop_port}\"; tls starttls; cert \"{}\"; key \"{}\"; }}\n\
         route {{ deliver maildir; }}\n",
        t.join("hop.pem").display(),
        t.join("hop.key").display()
    );
    let hop = Daemon::start(&hop_dir, &hop_policy, &[hop_port]);
    let policy = format!(
        "list local = domains [\"d.test\"];\n\
         server {{ hostname \"mx.test\"; spool \"spool\"; maildir \"mail\"; local_domains local; retry_min 1s; retry_max 2s; queue_run 1s; }}\n\
         listener smtp {{ address \"127.0.0.1:{port}\"; tls none; }}\n\
         route {{\n  if recipient.local :is \"pinned\" {{ deliver smtp \"[127.0.0.1]:{hop_port}\" :tls required :ca \"{}\"; }}\n  \
         deliver smtp \"[127.0.0.1]:{hop_port}\" :tls required;\n}}\n",
        t.join("ca.pem").display()
    );
    let d = Daemon::start(t.path(), &policy, &[port]);
    let out = swaks(port, &["--from", "a@d.test", "--to", "pinned@far.test", "--header", "Subject: via-private-ca"]);
    assert!(out.contains("Queued as"), "{out}");
    let out = swaks(port, &["--from", "a@d.test", "--to", "other@far.test", "--header", "Subject: no-ca-given"]);
    assert!(out.contains("Queued as"), "{out}");
    wait_for(
        Duration::from_secs(30),
        "the pinned message at the next hop",
        || maildir(&hop_dir.join("mail/pinned")).iter().any(|m| m.contains("via-private-ca")),
        || format!("{}\n--- hop ---\n{}", d.log(), hop.log()),
    );
    assert!(d.log().contains("tls=yes"), "{}", d.log());
    // Without :ca the certificate does not verify: deferred, never sent in clear.
    wait_for(
        Duration::from_secs(30),
        "the other message deferred",
        || d.log().contains("to=other@far.test") && d.log().contains("status=deferred"),
        || d.log(),
    );
    assert!(maildir(&hop_dir.join("mail/other")).is_empty());
}
