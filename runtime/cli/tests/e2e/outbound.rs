//! Outbound delivery (issue 17): BDAT and BINARYMIME out, SMTPUTF8 to a hop without it, implicit TLS with a client certificate, the fallback relay, per-destination concurrency, slow start and back-off.

use super::*;
use std::net::TcpListener;

/// A test CA and two certificates it signed, made with openssl in `dir`: `hop.pem`/`hop.key`
/// for a server at 127.0.0.1 and `client.pem`/`client.key` for a client (clientAuth).
fn issue_test_certificates(dir: &Path) {
    let openssl = |args: &[&str]| {
        let (st, out, err) = run_bounded(Command::new("openssl").args(args).current_dir(dir), Duration::from_secs(60));
        assert!(st.success(), "openssl {args:?}: {out}{err}");
    };
    let ca_subj = "/CN=mailpolicy outbound test CA";
    openssl(&[
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj",
        ca_subj,
    ]);
    std::fs::write(dir.join("hop.ext"), "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n").expect("ext");
    std::fs::write(dir.join("client.ext"), "subjectAltName=DNS:mx.test\nextendedKeyUsage=clientAuth\n").expect("ext");
    for (name, cn) in [("hop", "/CN=127.0.0.1"), ("client", "/CN=mx.test")] {
        let (key, csr, pem, ext) =
            (format!("{name}.key"), format!("{name}.csr"), format!("{name}.pem"), format!("{name}.ext"));
        openssl(&["req", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &csr, "-subj", cn]);
        openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &pem,
            "-days",
            "2",
            "-extfile",
            &ext,
        ]);
    }
}

/// A second daemon as the next hop: delivers every recipient to Maildirs under `dir/mail`.
fn next_hop(dir: &Path, listener: &str) -> Daemon {
    std::fs::create_dir_all(dir).expect("hop dir");
    let port: u16 = listener
        .split("127.0.0.1:")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .and_then(|p| p.parse().ok())
        .expect("the hop's port in its listener");
    let policy = format!(
        "list local = domains [\"far.test\"];\n\
         server {{ hostname \"hop.test\"; spool \"spool\"; maildir \"mail\"; local_domains local; }}\n\
         {listener}\n\
         route {{ deliver maildir; }}\n"
    );
    Daemon::start(dir, &policy, &[port])
}

/// The sending daemon: local domain s.test (Maildirs under `mail/`), `route` as given,
/// fast retries.
fn sender_policy(port: u16, extra_server: &str, route: &str) -> String {
    format!(
        "list local = domains [\"s.test\"];\n\
         server {{ hostname \"mx.test\"; spool \"spool\"; maildir \"mail\"; local_domains local; retry_min 1s; retry_max 2s; queue_run 1s; {extra_server} }}\n\
         listener smtp {{ address \"127.0.0.1:{port}\"; tls none; }}\n\
         route {{\n  if recipient.domain in local {{ deliver maildir; }}\n{route}\n}}\n"
    )
}

/// RFC 3030 outbound: a BINARYMIME message received by BDAT leaves by BDAT with
/// BODY=BINARYMIME when the next hop offers CHUNKING and BINARYMIME (our own daemon), and
/// arrives byte for byte (NUL, bare CR, a line of 2000 octets, a leading dot: DATA would
/// have changed each); to a hop without them (smtp-sink) it bounces with 5.6.3.
#[test]
fn bdat_binarymime_leaves_by_bdat_or_bounces_5_6_3() {
    let t = TempDir::new("bdat-out");
    let (port, hop_port, sink_port) = (free_port(), free_port(), free_port());
    let hop = next_hop(&t.join("hop"), &format!("listener smtp {{ address \"127.0.0.1:{hop_port}\"; tls none; }}"));
    let sink = Sink::start(&t.join("sink"), sink_port, &[]);
    let route = format!(
        "  if recipient.local :is \"tosink\" {{ deliver smtp \"[127.0.0.1]:{sink_port}\"; }}\n  deliver smtp \"[127.0.0.1]:{hop_port}\";"
    );
    let d = Daemon::start(t.path(), &sender_policy(port, "", &route), &[port]);
    let mut body =
        b"From: a@s.test\r\nSubject: binary-out\r\nMIME-Version: 1.0\r\nContent-Type: application/octet-stream\r\n\r\n"
            .to_vec();
    body.extend_from_slice(b"\x00\x01bare\rcr\r\n.leading dot\r\n");
    body.extend(std::iter::repeat_n(b'x', 2000));
    body.extend_from_slice(b"\r\n\xff\xfe end\r\n");
    let mut c = Smtp::connect(port).expect("connect");
    let (code, text) = c.send("a@s.test", &["u@far.test"], &body, Way::Bdat).expect("send");
    assert_eq!(code, 250, "{text}");
    let (code, text) = c.send("a@s.test", &["tosink@far.test"], &body, Way::Bdat).expect("send");
    assert_eq!(code, 250, "{text}");
    wait_for(
        Duration::from_secs(30),
        "the binary message at the next hop",
        || !maildir_bytes(&hop.dir.join("mail/u")).is_empty(),
        || format!("{}\n--- hop ---\n{}", d.log(), hop.log()),
    );
    let got = maildir_bytes(&hop.dir.join("mail/u")).remove(0);
    let (_, got_body) = split_message(&got);
    let (_, sent_body) = split_message(&body);
    assert_eq!(got_body, to_lf(&sent_body), "the body arrived byte for byte (Maildir stores LF line ends)");
    // smtp-sink offers neither CHUNKING nor BINARYMIME: a DSN with 5.6.3, nothing sent
    wait_for(
        Duration::from_secs(30),
        "the 5.6.3 DSN in mail/a",
        // (the DSN returns the binary original, so it is read as bytes)
        || maildir_bytes(&t.join("mail/a")).iter().any(|m| m.windows(14).any(|w| w == b"Status: 5.6.3\n")),
        || d.log(),
    );
    assert!(sink.messages().is_empty(), "{:?}", sink.messages());
}

/// RFC 6531 and 6533: SMTPUTF8 mail to a hop without SMTPUTF8 (smtp-sink) is not
/// downgraded: it bounces with 5.6.7 (554 for a UTF-8 header, 553 for a UTF-8 address), in
/// a `message/global-delivery-status` report that returns `message/global`, with the ENVID
/// as it came (xtext); to a hop with SMTPUTF8 (our daemon) it is delivered, ENVID passed on.
#[test]
fn smtputf8_to_a_hop_without_it_bounces_5_6_7_in_a_global_dsn() {
    let t = TempDir::new("utf8-out");
    let (port, hop_port, sink_port) = (free_port(), free_port(), free_port());
    let hop = next_hop(&t.join("hop"), &format!("listener smtp {{ address \"127.0.0.1:{hop_port}\"; tls none; }}"));
    let sink = Sink::start(&t.join("sink"), sink_port, &[]);
    let route = format!(
        "  if recipient.domain :is \"far.test\" {{ deliver smtp \"[127.0.0.1]:{hop_port}\"; }}\n  deliver smtp \"[127.0.0.1]:{sink_port}\";"
    );
    let d = Daemon::start(t.path(), &sender_policy(port, "", &route), &[port]);
    let mut c = Smtp::connect(port).expect("connect");
    let mut send = |to: &str, subject: &str| {
        let (code, text) = c.cmd("MAIL FROM:<a@s.test> SMTPUTF8 BODY=8BITMIME ENVID=QQ+2B314159 RET=FULL").unwrap();
        assert_eq!(code, 250, "{text}");
        let (code, text) = c.cmd(&format!("RCPT TO:<{to}>")).unwrap();
        assert_eq!(code, 250, "{text}");
        let (code, text) = c.cmd("DATA").unwrap();
        assert_eq!(code, 354, "{text}");
        let msg = format!("From: a@s.test\r\nSubject: {subject}\r\n\r\nbody\r\n.\r\n");
        c.w.write_all(msg.as_bytes()).unwrap();
        let (code, text) = c.reply().unwrap();
        assert_eq!(code, 250, "{text}");
    };
    send("u@sink.test", "gr\u{fc}\u{df}e-header");
    send("j\u{f6}rg@sink.test", "ascii-subject-utf8-address");
    send("u@far.test", "gr\u{fc}\u{df}e-delivered");
    wait_for(
        Duration::from_secs(30),
        "two 5.6.7 DSNs in mail/a",
        || maildir(&t.join("mail/a")).iter().filter(|m| m.contains("Status: 5.6.7")).count() == 2,
        || d.log(),
    );
    for (rcpt, code) in [("u@sink.test", "554 5.6.7"), ("j\u{f6}rg@sink.test", "553 5.6.7")] {
        let all = maildir(&t.join("mail/a"));
        let dsn = all.iter().find(|m| m.contains(&format!("; {rcpt}"))).unwrap_or_else(|| panic!("{all:?}"));
        assert!(dsn.contains("Content-Type: message/global-delivery-status"), "{dsn}");
        assert!(
            dsn.contains("Content-Type: message/global\r\n") || dsn.contains("Content-Type: message/global\n"),
            "{dsn}"
        );
        assert!(dsn.contains("Original-Envelope-Id: QQ+2B314159"), "{dsn}");
        assert!(dsn.contains(&format!("Diagnostic-Code: smtp; {code}")), "{dsn}");
    }
    wait_for(
        Duration::from_secs(30),
        "the SMTPUTF8 message at the hop",
        || maildir(&hop.dir.join("mail/u")).iter().any(|m| m.contains("gr\u{fc}\u{df}e-delivered")),
        || format!("{}\n--- hop ---\n{}", d.log(), hop.log()),
    );
    assert!(sink.messages().is_empty(), "nothing was downgraded: {:?}", sink.messages());
}

/// RFC 8314 and R43 outbound: `:tls implicit` speaks TLS from the first byte to a port-465
/// smarthost (our daemon's `submissions` listener), verified against `:ca`; `:cert`/`:key`
/// present a client certificate to a hop that requires one. Without the certificate that
/// hop refuses the handshake: deferred, never sent in clear.
#[test]
fn implicit_tls_smarthost_with_a_client_certificate() {
    let t = TempDir::new("implicit-out");
    issue_test_certificates(t.path());
    let (port, hop_port) = (free_port(), free_port());
    let p = |f: &str| t.join(f).display().to_string();
    let hop = next_hop(
        &t.join("hop"),
        &format!(
            "listener smtps {{ address \"127.0.0.1:{hop_port}\"; protocol submissions; auth none; cert \"{}\"; key \"{}\"; client_certs require; client_ca \"{}\"; }}",
            p("hop.pem"),
            p("hop.key"),
            p("ca.pem")
        ),
    );
    let route = format!(
        "  if recipient.local :is \"withcert\" {{ deliver smtp \"[127.0.0.1]:{hop_port}\" :tls implicit :ca \"{ca}\" :cert \"{cert}\" :key \"{key}\"; }}\n  \
         deliver smtp \"[127.0.0.1]:{hop_port}\" :tls implicit :ca \"{ca}\";",
        ca = p("ca.pem"),
        cert = p("client.pem"),
        key = p("client.key")
    );
    let d = Daemon::start(t.path(), &sender_policy(port, "", &route), &[port]);
    for to in ["withcert@far.test", "nocert@far.test"] {
        let out = swaks(port, &["--from", "a@s.test", "--to", to, "--header", &format!("Subject: implicit-{to}")]);
        assert!(out.contains("Queued as"), "{out}");
    }
    wait_for(
        Duration::from_secs(30),
        "the message at the implicit-TLS hop",
        || maildir(&hop.dir.join("mail/withcert")).iter().any(|m| m.contains("implicit-withcert")),
        || format!("{}\n--- hop ---\n{}", d.log(), hop.log()),
    );
    let log = d.log();
    let sent = log.lines().find(|l| l.contains("to=withcert@far.test") && l.contains("status=sent")).expect("sent");
    assert!(sent.contains("tls=yes"), "{sent}");
    wait_for(
        Duration::from_secs(30),
        "the message without a certificate deferred",
        || d.log().lines().any(|l| l.contains("to=nocert@far.test") && l.contains("status=deferred")),
        || d.log(),
    );
    assert!(maildir(&hop.dir.join("mail/nocert")).is_empty());
}

/// R33: MX delivery that fails temporarily (the only MX host refuses connections) goes to
/// the server's `fallback_relay`; a domain that does not exist is bounced, never sent there.
#[test]
fn fallback_relay_takes_what_the_mx_hosts_cannot() {
    let t = TempDir::new("fallback");
    let ub = Unbound::start(
        &["test."],
        &["far.test. MX 10 mx.far.test.", "mx.far.test. A 127.0.0.9", "direct.test. MX 10 mx.far.test."],
        &[],
    );
    let (port, sink_port) = (free_port(), free_port());
    let sink = Sink::start(&t.join("sink"), sink_port, &[]);
    let extra = format!("dns_server \"127.0.0.1:{}\"; fallback_relay \"[127.0.0.1]:{sink_port}\";", ub.port);
    // direct.test goes by `deliver smtp` through its MX: the fallback is for `mx` alone
    let route = "  if recipient.domain :is \"direct.test\" { deliver smtp \"direct.test\"; }\n  deliver mx;";
    let d = Daemon::start(t.path(), &sender_policy(port, &extra, route), &[port]);
    for to in ["u@far.test", "v@nowhere.test", "w@direct.test"] {
        let out = swaks(port, &["--from", "a@s.test", "--to", to, "--header", &format!("Subject: fb-{to}")]);
        assert!(out.contains("Queued as"), "{out}");
    }
    wait_for(
        Duration::from_secs(60),
        "the far.test message at the fallback relay",
        || sink.messages().iter().any(|m| m.contains("fb-u@far.test")),
        || d.log(),
    );
    let log = d.log();
    let sent = log.lines().find(|l| l.contains("to=u@far.test") && l.contains("status=sent")).expect("sent line");
    assert!(sent.contains(&format!("[127.0.0.1]:{sink_port}")), "the relay is the fallback host: {sent}");
    wait_for(
        Duration::from_secs(30),
        "the nowhere.test bounce",
        || maildir(&t.join("mail/a")).iter().any(|m| m.contains("v@nowhere.test") && m.contains("Status: 5.4.4")),
        || d.log(),
    );
    wait_for(
        Duration::from_secs(30),
        "direct.test deferred",
        || d.log().lines().any(|l| l.contains("to=w@direct.test") && l.contains("status=deferred")),
        || d.log(),
    );
    let msgs = sink.messages();
    assert!(!msgs.iter().any(|m| m.contains("nowhere.test") || m.contains("direct.test")), "{msgs:?}");
}

/// A loopback server for the scheduler test: `greeting` None accepts and never says a word
/// (a destination that hangs under load), Some(text) sends it and hangs up. Counts sessions.
fn scripted_server(greeting: Option<&'static str>) -> (u16, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    let n = Arc::new(AtomicUsize::new(0));
    let count = n.clone();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            count.fetch_add(1, Ordering::SeqCst);
            match greeting {
                Some(g) => {
                    let _ = s.write_all(g.as_bytes());
                }
                None => held.push(s),
            }
        }
    });
    (port, n)
}

/// What the counting proxy in front of a sink saw.
#[derive(Default)]
struct ProxyStats {
    open: usize,
    max_open: usize,
    /// For each accepted connection in order: how many messages the sink had stored then.
    stored_at_accept: Vec<usize>,
}

/// A TCP proxy on a port of its own in front of `sink`, counting the sessions open at once.
fn counting_proxy(sink: &Sink) -> (u16, Arc<Mutex<ProxyStats>>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    let stats = Arc::new(Mutex::new(ProxyStats::default()));
    let (st, to, dir) = (stats.clone(), sink.port, sink.dir.clone());
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(client) = c else { continue };
            let stored = std::fs::read_dir(&dir).map(|d| d.count()).unwrap_or(0);
            {
                let mut s = st.lock().unwrap();
                s.open += 1;
                s.max_open = s.max_open.max(s.open);
                s.stored_at_accept.push(stored);
            }
            let Ok(server) = TcpStream::connect(("127.0.0.1", to)) else { continue };
            let st = st.clone();
            std::thread::spawn(move || {
                let (mut c2, mut s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let up = std::thread::spawn(move || {
                    let _ = std::io::copy(&mut c2, &mut s2);
                    let _ = s2.shutdown(std::net::Shutdown::Write);
                });
                let (mut s3, mut c3) = (server, client);
                let _ = std::io::copy(&mut s3, &mut c3);
                let _ = c3.shutdown(std::net::Shutdown::Both);
                st.lock().unwrap().open -= 1;
                let _ = up.join();
            });
        }
    });
    (port, stats)
}

/// R31, per-destination scheduling end to end: a destination that hangs (accepts, never
/// greets) holds only its slow-start window of 2 sessions and does not delay mail to other
/// destinations; one that answers 421 is tried at most a few times and then backed off (its
/// other messages wait, untried); a healthy destination (smtp-sink taking a second per
/// message, behind a counting proxy) gets at most `destination_concurrency` sessions, and its
/// third session only opens after a first message went through (slow start).
#[test]
fn per_destination_concurrency_slow_start_and_backoff() {
    let t = TempDir::new("sched");
    let (port, sink_port) = (free_port(), free_port());
    let sink = Sink::start(&t.join("sink"), sink_port, &["-w", "1"]);
    let (good, stats) = counting_proxy(&sink);
    let (hang, hang_sessions) = scripted_server(None);
    let (busy, busy_sessions) = scripted_server(Some("421 4.3.2 too busy\r\n"));
    let policy = format!(
        "list local = domains [\"s.test\"];\n\
         server {{ hostname \"mx.test\"; spool \"spool\"; maildir \"mail\"; local_domains local; retry_min 10m; retry_max 20m; queue_run 10m; destination_concurrency 3; }}\n\
         listener smtp {{ address \"127.0.0.1:{port}\"; tls none; }}\n\
         route {{\n  if recipient.domain :is \"hang.test\" {{ deliver smtp \"[127.0.0.1]:{hang}\"; }}\n  \
         if recipient.domain :is \"busy.test\" {{ deliver smtp \"[127.0.0.1]:{busy}\"; }}\n  \
         deliver smtp \"[127.0.0.1]:{good}\";\n}}\n"
    );
    let d = Daemon::start(t.path(), &policy, &[port]);
    let mut c = Smtp::connect(port).expect("connect");
    let msg = |i: usize| format!("From: a@s.test\r\nSubject: m{i}\r\n\r\nbody\r\n").into_bytes();
    for i in 0..8 {
        for dom in ["hang.test", "busy.test"] {
            let (code, text) = c.send("a@s.test", &[&format!("u{i}@{dom}")], &msg(i), Way::Data).expect("send");
            assert_eq!(code, 250, "{text}");
        }
    }
    for i in 0..9 {
        let (code, text) = c.send("a@s.test", &[&format!("u{i}@good.test")], &msg(i), Way::Data).expect("send");
        assert_eq!(code, 250, "{text}");
    }
    wait_for(
        Duration::from_secs(60),
        "the nine good.test messages delivered while hang.test hangs",
        || sink.messages().len() == 9,
        || d.log(),
    );
    let s = stats.lock().unwrap();
    assert_eq!(s.max_open, 3, "destination_concurrency 3 reached and never passed: {:?}", s.stored_at_accept);
    assert!(
        s.stored_at_accept.get(2).is_some_and(|n| *n >= 1),
        "slow start: the third session opened only after a delivery: {:?}",
        s.stored_at_accept
    );
    drop(s);
    assert_eq!(hang_sessions.load(Ordering::SeqCst), 2, "the hanging destination holds its initial window of 2");
    let busy_n = busy_sessions.load(Ordering::SeqCst);
    assert!((1..=3).contains(&busy_n), "busy.test backed off after {busy_n} of 8 attempts\n{}", d.log());
    let log = d.log();
    assert!(!log.lines().any(|l| l.contains("@hang.test") && l.contains("status=")), "nothing of hang.test ended");
    // The daemon's own delivery events (the Postfix-style summary lines say `status=` too).
    let deferred = log
        .lines()
        .filter(|l| l.contains(" delivery id=") && l.contains("@busy.test") && l.contains("status=deferred"));
    assert_eq!(deferred.count(), busy_n);
}
