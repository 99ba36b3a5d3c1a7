//! The last lines of defence: a panic in one message, a dead queue manager, a session that dies; one archive copy per message.

use super::*;

fn fault_policy(port: u16) -> String {
    format!(
        "list local = domains [\"d.test\"];\n\
         server {{ hostname \"mx.test\"; spool \"spool\"; maildir \"mail\"; local_domains local; retry_min 1s; retry_max 2s; queue_run 1s; }}\n\
         listener smtp {{ address \"127.0.0.1:{port}\"; tls none; }}\n\
         route {{ deliver maildir; }}\n"
    )
}

fn send_marked(port: u16, to: &str, marker: &str) -> (u16, String) {
    let mut c = Smtp::connect(port).expect("connect");
    let msg = format!("From: a@d.test\r\nTo: {to}\r\nSubject: {marker}\r\n\r\nbody {marker}\r\n");
    let r = c.send("a@d.test", &[to], msg.as_bytes(), Way::Data).expect("send");
    let _ = c.cmd("QUIT");
    r
}

/// Issue 20.1: a failure in one message's processing (a panic, injected) moves that message
/// to corrupt/ with a log line, and the queue goes on: in routing and in delivery.
#[test]
fn a_panic_in_one_message_moves_it_to_corrupt_and_the_queue_goes_on() {
    let t = TempDir::new("fault-msg");
    let port = free_port();
    let d = Daemon::start_env(
        t.path(),
        &fault_policy(port),
        &[port],
        &[("MAILPOLICY_FAULT", "qmgr-admit:POISON-ROUTE,delivery:POISON-DELIVERY")],
    );
    assert_eq!(send_marked(port, "p1@d.test", "POISON-ROUTE").0, 250);
    assert_eq!(send_marked(port, "p2@d.test", "POISON-DELIVERY").0, 250);
    assert_eq!(send_marked(port, "ok@d.test", "fine-after").0, 250);
    wait_for(
        Duration::from_secs(30),
        "the good message delivered",
        || maildir(&t.join("mail/ok")).len() == 1,
        || d.log(),
    );
    wait_for(
        Duration::from_secs(30),
        "both poisoned messages in corrupt/",
        || files_under(&d.spool().join("corrupt")).len() >= 2,
        || format!("{:?}\n{}", files_under(&d.spool()), d.log()),
    );
    let log = d.log();
    assert!(log.contains("corrupt") && log.contains("processing failed: fault injection at qmgr-admit"), "{log}");
    assert!(log.contains("delivery failed: fault injection at delivery"), "{log}");
    assert!(!log.contains("qmgr-died"), "the queue manager itself survived:\n{log}");
    assert!(maildir(&t.join("mail/p1")).is_empty() && maildir(&t.join("mail/p2")).is_empty());
    assert_eq!(send_marked(port, "ok2@d.test", "still-fine").0, 250);
    wait_for(Duration::from_secs(30), "later mail delivered", || maildir(&t.join("mail/ok2")).len() == 1, || d.log());
}

/// Issue 20.1: when the queue manager itself dies, new mail is answered 451 4.3.0 until its
/// supervisor has restarted it; the message that killed it is in corrupt/ and neither the
/// supervisor's restart nor a daemon restart runs it again.
#[test]
fn a_dead_queue_manager_answers_451_until_it_is_back() {
    let t = TempDir::new("fault-task");
    let port = free_port();
    let mut d = Daemon::start_env(t.path(), &fault_policy(port), &[port], &[("MAILPOLICY_FAULT", "qmgr-task:KILLER")]);
    // A transaction held open before its final dot, to be finished while the manager is down.
    let mut held = Smtp::connect(port).expect("connect");
    assert_eq!(held.cmd("MAIL FROM:<a@d.test>").expect("mail").0, 250);
    assert_eq!(held.cmd("RCPT TO:<while-down@d.test>").expect("rcpt").0, 250);
    assert_eq!(held.cmd("DATA").expect("data").0, 354);
    held.w.write_all(b"Subject: while down\r\n\r\nx\r\n").expect("write");
    assert_eq!(send_marked(port, "victim@d.test", "KILLER").0, 250);
    wait_for(Duration::from_secs(30), "the queue manager to die", || d.log().contains("qmgr-died"), || d.log());
    held.w.write_all(b".\r\n").expect("dot");
    let (code, text) = held.reply().expect("reply");
    assert!(code == 451 && text.contains("4.3.0"), "new mail while the queue manager is down: {text}\n{}", d.log());
    wait_for(Duration::from_secs(30), "the restart", || d.log().contains("qmgr-restarted"), || d.log());
    assert_eq!(send_marked(port, "after@d.test", "after").0, 250);
    wait_for(
        Duration::from_secs(30),
        "mail after the restart",
        || maildir(&t.join("mail/after")).len() == 1,
        || d.log(),
    );
    assert_eq!(files_under(&d.spool().join("corrupt")).len(), 1, "{}", d.log());
    assert!(maildir(&t.join("mail/victim")).is_empty());
    // A daemon restart does not run it again either.
    d.kill9();
    d.restart();
    assert_eq!(send_marked(port, "after2@d.test", "after2").0, 250);
    wait_for(
        Duration::from_secs(30),
        "mail after a daemon restart",
        || maildir(&t.join("mail/after2")).len() == 1,
        || d.log(),
    );
    assert_eq!(d.log().matches("qmgr-died").count(), 1, "{}", d.log());
}

/// Issue 20.3: a session that dies (a panic, injected) releases its `concurrent by
/// client.ip` count: three of them do not lock the address out.
#[test]
fn a_session_that_dies_releases_its_concurrency_count() {
    let t = TempDir::new("fault-session");
    let port = free_port();
    let policy = format!(
        "require \"ratelimit\";\nlist local = domains [\"d.test\"];\n\
         server {{ hostname \"mx.test\"; spool \"spool\"; maildir \"mail\"; local_domains local; }}\n\
         listener smtp {{ address \"127.0.0.1:{port}\"; tls none; }}\n\
         on connect {{ if concurrent by client.ip > 2 {{ tempfail 421 4.7.0 \"Too many connections from you\"; }} }}\n\
         route {{ deliver maildir; }}\n"
    );
    let d = Daemon::start_env(t.path(), &policy, &[port], &[("MAILPOLICY_FAULT", "session:SESSION-KILLER")]);
    for i in 0..3 {
        let mut c = Smtp::connect(port).expect("connect");
        let msg = b"Subject: SESSION-KILLER\r\n\r\nx\r\n";
        let r = c.send("a@d.test", &["x@d.test"], msg, Way::Data);
        assert!(r.is_err(), "session {i} was to die: {r:?}");
    }
    wait_for(
        Duration::from_secs(10),
        "three failed sessions",
        || d.log().matches("session-failed").count() == 3,
        || d.log(),
    );
    for i in 0..4 {
        let (code, text) = send_marked(port, "ok@d.test", &format!("after-{i}"));
        assert_eq!(code, 250, "connection {i} after the dead sessions: {text}\n{}", d.log());
    }
}

/// Issue 20.7: a message to an expanded list gets one archive copy, from its own sender.
#[test]
fn one_archive_copy_per_message_to_an_expanded_list() {
    let t = TempDir::new("archive-once");
    let port = free_port();
    std::fs::write(t.join("aliases"), "team@d.test x@d.test, y@d.test\nowner-team@d.test boss@d.test\n")
        .expect("aliases");
    let policy = format!(
        "list local = domains [\"d.test\"];\ntable aliases = map \"aliases\";\n\
         server {{ hostname \"mx.test\"; spool \"spool\"; maildir \"mail\"; local_domains local; }}\n\
         listener smtp {{ address \"127.0.0.1:{port}\"; tls none; }}\n\
         on data {{ archive \"arch\"; }}\n\
         route {{ expand aliases; archive \"routed\"; deliver maildir; }}\n"
    );
    let d = Daemon::start(t.path(), &policy, &[port]);
    let out = swaks(port, &["--from", "sender@c.test", "--to", "team@d.test", "--header", "Subject: to the team"]);
    assert!(out.contains("Queued as"), "{out}");
    wait_for(
        Duration::from_secs(20),
        "both members and an empty queue",
        || {
            maildir(&t.join("mail/x")).len() == 1
                && maildir(&t.join("mail/y")).len() == 1
                && spool_messages(&d.spool()).is_empty()
        },
        || d.log(),
    );
    for folder in ["arch", "routed"] {
        let copies = maildir(&t.join(&format!("mail/{folder}")));
        assert_eq!(copies.len(), 1, "one {folder} copy per message:\n{}", d.log());
        assert!(copies[0].starts_with("Return-Path: <sender@c.test>"), "{}", copies[0]);
    }
}
