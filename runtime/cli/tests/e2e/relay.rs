//! smtp-sink as the next hop: relaying, 4xx retries, 5xx bounces, DSNs, soft_bounce, double bounces.

use super::*;

// ================================================================== 2. smtp-sink as next hop

#[test]
fn relay_to_smtp_sink() {
    let t = TempDir::new("relay");
    let (port, sport) = (free_port(), free_port());
    let sink = Sink::start(&t.join("sink"), sport, &[]);
    let d = Daemon::start(t.path(), &base_policy(port, sink.port, "none"), &[port]);
    let out = swaks(port, &["--from", "a@s.test", "--to", "x@far.test,y@far.test", "--header", "Subject: relayed-e2e"]);
    assert!(out.contains("Queued as"), "{out}");
    wait_for(
        Duration::from_secs(30),
        "the message at smtp-sink",
        || sink.messages().iter().any(|m| m.contains("Subject: relayed-e2e")),
        || d.log(),
    );
    let m = sink.messages().into_iter().find(|m| m.contains("relayed-e2e")).unwrap_or_default();
    assert!(m.contains("X-Mail-Args: <a@s.test>"), "{m}");
    assert!(m.contains("<x@far.test>") && m.contains("<y@far.test>"), "{m}");
    assert!(m.contains("by mx.test (mailpolicy)"), "our Received: header: {m}");
    wait_for(Duration::from_secs(20), "an empty queue", || spool_messages(&d.spool()).is_empty(), || d.log());
    assert!(d.log().contains("status=sent"), "{}", d.log());
}

#[test]
fn sink_4xx_defers_then_delivers_after_retry() {
    let t = TempDir::new("defer");
    let (port, sport) = (free_port(), free_port());
    let sink = Sink::start(&t.join("sink-4xx"), sport, &["-r", "RCPT"]);
    let mut d = Daemon::start(t.path(), &base_policy(port, sport, "none"), &[port]);
    let out = swaks(port, &["--from", "a@s.test", "--to", "x@far.test", "--header", "Subject: deferred-e2e"]);
    assert!(out.contains("Queued as"), "{out}");
    let id = out.lines().find_map(|l| l.split("Queued as ").nth(1)).map(|s| s.trim().to_string()).expect("queue id");
    // deferred: still in the spool, listed with the sink's 4xx reply
    wait_for(
        Duration::from_secs(30),
        "the message listed as deferred with a 4xx reply",
        || {
            let listing = queue_list(&d.spool());
            listing.contains(&id) && listing.contains("(4") && listing.contains("x@far.test")
        },
        || format!("{}\n{}", queue_list(&d.spool()), d.log()),
    );
    assert!(d.log().contains("status=deferred"), "{}", d.log());
    assert!(sink.messages().is_empty());
    assert!(maildir(&t.join("mail/a")).is_empty(), "no DSN for a deferral this early");
    // a deferred message survives kill -9: recovered at start, still listed, retried
    d.kill9();
    d.restart();
    assert!(d.log().contains("recovered=1"), "{}", d.log());
    let listing = queue_list(&d.spool());
    assert!(listing.contains(&id) && listing.contains("x@far.test"), "{listing}");
    // the next hop gets well: the retry (retry_max 2s) delivers it
    drop(sink);
    let good = Sink::start(&t.join("sink-ok"), sport, &[]);
    wait_for(
        Duration::from_secs(30),
        "the deferred message at the healthy sink",
        || good.messages().iter().any(|m| m.contains("Subject: deferred-e2e")),
        || format!("{}\n{}", queue_list(&d.spool()), d.log()),
    );
    wait_for(Duration::from_secs(20), "an empty queue", || spool_messages(&d.spool()).is_empty(), || d.log());
}

#[test]
fn sink_5xx_at_rcpt_and_at_dot_bounce_to_the_sender() {
    let t = TempDir::new("bounce");
    let (port, s_rcpt, s_dot) = (free_port(), free_port(), free_port());
    let sink_rcpt = Sink::start(&t.join("sink-rcpt"), s_rcpt, &["-f", "RCPT"]);
    let sink_dot = Sink::start(&t.join("sink-dot"), s_dot, &["-f", "."]);
    let policy = base_policy(port, s_rcpt, "none").replace(
        "  deliver smtp",
        &format!("  if recipient.domain :is \"dot.test\" {{\n    deliver smtp \"[127.0.0.1]:{s_dot}\";\n  }}\n  deliver smtp"),
    );
    let d = Daemon::start(t.path(), &policy, &[port]);
    for (to, subject) in [("x@rcpt.test", "bounce-at-rcpt"), ("y@dot.test", "bounce-at-dot")] {
        let out = swaks(port, &["--from", "a@s.test", "--to", to, "--header", &format!("Subject: {subject}")]);
        assert!(out.contains("Queued as"), "{out}");
    }
    // both DSNs arrive in the sender's Maildir (s.test is local)
    wait_for(
        Duration::from_secs(30),
        "two failure DSNs in mail/a",
        || maildir(&t.join("mail/a")).len() == 2,
        || d.log(),
    );
    for (rcpt, subject) in [("x@rcpt.test", "bounce-at-rcpt"), ("y@dot.test", "bounce-at-dot")] {
        let all = maildir(&t.join("mail/a"));
        let dsn = all.iter().find(|m| m.contains(rcpt)).unwrap_or_else(|| panic!("no DSN naming {rcpt}: {all:?}"));
        assert!(dsn.contains("multipart/report"), "{dsn}");
        assert!(dsn.contains("report-type=delivery-status"), "{dsn}");
        assert!(dsn.contains("Action: failed"), "{dsn}");
        assert!(dsn.contains("Status: 5."), "{dsn}");
        assert!(dsn.contains(&format!("rfc822;{rcpt}")) || dsn.contains(&format!("rfc822; {rcpt}")), "{dsn}");
        assert!(dsn.contains(&format!("Subject: {subject}")), "the original's headers come back: {dsn}");
        assert!(dsn.contains("Return-Path: <>"), "a DSN has the null sender: {dsn}");
        assert!(dsn.contains("Diagnostic-Code: smtp; 5"), "the sink's reply: {dsn}");
    }
    assert!(d.log().contains("status=bounced") || d.log().contains("kind=failure"), "{}", d.log());
    assert!(sink_rcpt.messages().is_empty());
    // A DSN that was delivered owes nobody a notice: no misleading `dsn-dropped` line.
    wait_for(Duration::from_secs(20), "the DSNs delivered", || d.log().matches("status=sent").count() >= 2, || d.log());
    assert!(!d.log().contains("dsn-dropped"), "{}", d.log());
    // (a `-f .` sink dumps the data before it answers 5xx, so its files say nothing)
    drop(sink_dot);
    wait_for(
        Duration::from_secs(20),
        "an empty queue",
        || spool_messages(&d.spool()).is_empty(),
        || format!("{}\n{}", queue_list(&d.spool()), d.log()),
    );
}

/// R1, RFC 3461 section 4: a NOTIFY=SUCCESS recipient relayed to a server without DSN gets
/// one "relayed" notice; relayed to a server with DSN, NOTIFY goes on and we send nothing.
#[test]
fn dsn_success_on_relay_is_one_relayed_notice_or_none() {
    let t = TempDir::new("dsnrelay");
    let (port, s_plain, s_dsn) = (free_port(), free_port(), free_port());
    let plain = Sink::start(&t.join("sink-nodsn"), s_plain, &["-N"]);
    let with_dsn = Sink::start(&t.join("sink-dsn"), s_dsn, &[]);
    let policy = base_policy(port, s_plain, "none").replace(
        "  deliver smtp",
        &format!("  if recipient.domain :is \"dsn.test\" {{\n    deliver smtp \"[127.0.0.1]:{s_dsn}\";\n  }}\n  deliver smtp"),
    );
    let d = Daemon::start(t.path(), &policy, &[port]);
    let mut c = Client::connect(port).expect("connect");
    for (to, subject) in [("x@plain.test", "relayed-no-dsn"), ("y@dsn.test", "relayed-with-dsn")] {
        c.cmd("MAIL FROM:<a@s.test>", 250).expect("MAIL");
        c.cmd(&format!("RCPT TO:<{to}> NOTIFY=SUCCESS,FAILURE"), 250).expect("RCPT");
        c.cmd("DATA", 354).expect("DATA");
        c.w.write_all(format!("Subject: {subject}\r\n\r\nhello\r\n.\r\n").as_bytes()).expect("data");
        c.expect(250).expect("queued");
    }
    let _ = c.cmd("QUIT", 221);
    wait_for(
        Duration::from_secs(30),
        "both messages at their sinks",
        || {
            plain.messages().iter().any(|m| m.contains("relayed-no-dsn"))
                && with_dsn.messages().iter().any(|m| m.contains("relayed-with-dsn"))
        },
        || d.log(),
    );
    // The DSN-capable hop got NOTIFY passed on.
    let m = with_dsn.messages().into_iter().find(|m| m.contains("relayed-with-dsn")).unwrap_or_default();
    assert!(m.to_ascii_uppercase().contains("NOTIFY=SUCCESS"), "NOTIFY passed on: {m}");
    wait_for(Duration::from_secs(30), "a notice in mail/a", || !maildir(&t.join("mail/a")).is_empty(), || d.log());
    wait_for(Duration::from_secs(20), "an empty queue", || spool_messages(&d.spool()).is_empty(), || d.log());
    let notices = maildir(&t.join("mail/a"));
    assert_eq!(notices.len(), 1, "exactly one success notice: {notices:#?}\n{}", d.log());
    let n = &notices[0];
    assert!(n.contains("Action: relayed"), "{n}");
    assert!(n.contains("x@plain.test"), "{n}");
    assert!(!n.contains("y@dsn.test"), "{n}");
    assert!(!n.contains("Action: delivered"), "{n}");
}

/// R40 soft_bounce: a remote 5xx defers the recipient (4xx) instead of bouncing it.
#[test]
fn soft_bounce_defers_a_remote_5xx() {
    let t = TempDir::new("softbounce");
    let (port, s_rcpt) = (free_port(), free_port());
    let _sink = Sink::start(&t.join("sink-rcpt"), s_rcpt, &["-f", "RCPT"]);
    let policy = base_policy(port, s_rcpt, "none").replace("  queue_run 1s;", "  queue_run 1s;\n  soft_bounce true;");
    let d = Daemon::start(t.path(), &policy, &[port]);
    let out = swaks(port, &["--from", "a@s.test", "--to", "x@rcpt.test", "--header", "Subject: soft-bounced"]);
    assert!(out.contains("Queued as"), "{out}");
    wait_for(
        Duration::from_secs(30),
        "the recipient deferred with a 4xx",
        || d.log().matches("status=deferred").count() >= 2,
        || format!("{}\n{}", queue_list(&d.spool()), d.log()),
    );
    let listing = queue_list(&d.spool());
    assert!(listing.contains("x@rcpt.test") && listing.contains("(4"), "{listing}");
    assert!(!d.log().contains("status=bounced"), "{}", d.log());
    assert!(maildir(&t.join("mail/a")).is_empty(), "no bounce under soft_bounce");
}

/// A bounce that cannot be delivered (a null-sender message refused by the next hop) is a
/// double bounce: it goes to the server's `postmaster`, and only once.
#[test]
fn double_bounce_goes_to_postmaster() {
    let t = TempDir::new("double");
    let (port, s_rcpt) = (free_port(), free_port());
    let _sink = Sink::start(&t.join("sink-rcpt"), s_rcpt, &["-f", "RCPT"]);
    let policy =
        base_policy(port, s_rcpt, "none").replace("  queue_run 1s;", "  queue_run 1s;\n  postmaster \"pm@d.test\";");
    let d = Daemon::start(t.path(), &policy, &[port]);
    let out = swaks(port, &["--from", "<>", "--to", "x@remote.test", "--header", "Subject: a bounce nobody wants"]);
    assert!(out.contains("Queued as"), "{out}");
    wait_for(
        Duration::from_secs(30),
        "a double-bounce notice in mail/pm",
        || maildir(&t.join("mail/pm")).len() == 1,
        || d.log(),
    );
    let notice = &maildir(&t.join("mail/pm"))[0];
    assert!(notice.contains("multipart/report"), "{notice}");
    assert!(notice.contains("X-Mailpolicy-Double-Bounce: yes"), "{notice}");
    assert!(notice.contains("x@remote.test"), "{notice}");
    assert!(notice.contains("Subject: a bounce nobody wants"), "{notice}");
    assert!(d.log().contains("kind=double-bounce"), "{}", d.log());
    wait_for(
        Duration::from_secs(20),
        "an empty queue",
        || spool_messages(&d.spool()).is_empty(),
        || format!("{}\n{}", queue_list(&d.spool()), d.log()),
    );
    // Nothing went back to the null sender, and there was exactly one notice.
    assert_eq!(maildir(&t.join("mail/pm")).len(), 1);
}
