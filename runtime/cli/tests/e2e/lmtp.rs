//! Dovecot LMTP as the next hop.

use super::*;

// ================================================================== 3. Dovecot LMTP

#[test]
fn lmtp_to_dovecot() {
    let t = TempDir::new("lmtp");
    let dv = Dovecot::start();
    let port = free_port();
    let policy = base_policy(port, free_port(), "none").replace(
        "  if recipient.domain in local {",
        &format!("  if recipient.domain :is \"d.test\" {{\n    deliver lmtp \"[127.0.0.1]:{}\";\n  }}\n  if recipient.domain in local {{", dv.port),
    );
    let d = Daemon::start(t.path(), &policy, &[port]);
    let out = swaks(
        port,
        &[
            "--from",
            "a@s.test",
            "--to",
            "u1@d.test,nosuchuser@d.test",
            "--header",
            "Subject: lmtp-e2e",
            "--body",
            "line one\n.dot line\n",
        ],
    );
    assert!(out.contains("Queued as"), "{out}");
    wait_for(
        Duration::from_secs(30),
        "the message in Dovecot's Maildir",
        || maildir(&dv.mail).iter().any(|m| m.contains("Subject: lmtp-e2e")),
        || format!("{}\n{}", d.log(), dv.log_text()),
    );
    let m = maildir(&dv.mail).into_iter().find(|m| m.contains("lmtp-e2e")).unwrap_or_default();
    assert!(m.contains("Return-Path: <a@s.test>"), "{m}");
    assert!(m.contains("\n.dot line"), "dot-stuffing undone end to end: {m}");
    assert!(m.contains("by mx.test (mailpolicy)"), "{m}");
    // the unknown user is refused by Dovecot per recipient: a DSN to the sender
    wait_for(
        Duration::from_secs(30),
        "a DSN for nosuchuser@d.test",
        || maildir(&t.join("mail/a")).iter().any(|m| m.contains("nosuchuser@d.test") && m.contains("multipart/report")),
        || d.log(),
    );
    assert_eq!(maildir(&dv.mail).len(), 1, "delivered once");
}
