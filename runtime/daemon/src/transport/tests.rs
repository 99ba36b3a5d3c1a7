//! Transport tests that need no peer: MX selection through a static resolver,
//! Maildir/mbox delivery, DSN structure and the RFC 3461 notify rules. The driver against
//! real peers is in `tests/peers.rs`.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::client::*;
use super::driver::*;
use super::dsn::*;
use super::local;
use super::mx::*;
use crate::smtp::{
    parse_forward_path, parse_reverse_path, Envelope, MailParams, Notify, Orcpt, RcptParams, Recipient, Reply, Ret,
    ReversePath,
};

fn rcpt(a: &str) -> Recipient {
    Recipient {
        path: parse_forward_path(&format!("<{a}>"), true).expect("test address"),
        params: RcptParams::default(),
    }
}

fn env(from: &str, to: &[&str]) -> Envelope {
    Envelope {
        from: parse_reverse_path(&format!("<{from}>"), true).expect("test address"),
        params: MailParams::default(),
        recipients: to.iter().map(|a| rcpt(a)).collect(),
    }
}

fn opts(resolver: StaticResolver) -> DeliveryOptions {
    let mut o = DeliveryOptions::new("client.test", Arc::new(resolver));
    o.timeouts = Timeouts::all(Duration::from_secs(5));
    o.tls = TlsPolicy::None;
    o
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

// ---------------------------------------------------------------- MX

#[test]
fn destination_syntax() {
    let d = Destination::parse("example.com").unwrap();
    assert_eq!((d.host.as_str(), d.port, d.mx), ("example.com", 25, true));
    let d = Destination::parse("example.com:2525").unwrap();
    assert_eq!((d.port, d.mx), (2525, true));
    let d = Destination::parse("[relay.example.com]:587").unwrap();
    assert_eq!((d.host.as_str(), d.port, d.mx), ("relay.example.com", 587, false));
    let d = Destination::parse("[IPv6:2001:db8::1]").unwrap();
    assert_eq!((d.host.as_str(), d.mx), ("2001:db8::1", false));
    assert!(!Destination::parse("192.0.2.1").unwrap().mx);
    for bad in ["", "[x", "[]:25", "a:b", "[x]25", "a:99999"] {
        assert!(Destination::parse(bad).is_none(), "{bad}");
    }
    assert_eq!(
        Target::parse("lmtp:unix:/run/dovecot/lmtp"),
        Some(Target::Lmtp(LmtpEndpoint::Unix("/run/dovecot/lmtp".into())))
    );
    match Target::parse("lmtp:inet:127.0.0.1").unwrap() {
        Target::Lmtp(LmtpEndpoint::Tcp(d)) => assert_eq!((d.port, d.mx), (24, false)),
        t => panic!("{t:?}"),
    }
    assert!(matches!(Target::parse("maildir:/var/mail/u/"), Some(Target::Maildir(_))));
}

#[test]
fn mx_preference_order_and_shuffle() {
    let mut r = StaticResolver::new();
    r.add_mx("d.test", 20, "mx3.d.test")
        .add_mx("d.test", 10, "mx1.d.test")
        .add_mx("d.test", 10, "mx2.d.test")
        .add_ip("mx1.d.test", ip("192.0.2.1"))
        .add_ip("mx2.d.test", ip("192.0.2.2"))
        .add_ip("mx3.d.test", ip("192.0.2.3"))
        .add_ip("mx3.d.test", ip("2001:db8::3"));
    let rt = rt();
    let me = LocalIdentity::default();
    let mut firsts = std::collections::HashSet::new();
    for _ in 0..64 {
        let hops = rt.block_on(resolve(&r, &Destination::domain("d.test"), &me)).unwrap();
        let names: Vec<&str> = hops.iter().map(|h| h.name.as_str()).collect();
        assert_eq!(names.len(), 4);
        assert!(names[..2].contains(&"mx1.d.test") && names[..2].contains(&"mx2.d.test"));
        assert_eq!(&names[2..], &["mx3.d.test", "mx3.d.test"]);
        assert_eq!(hops[0].addr.port(), 25);
        firsts.insert(names[0].to_string());
    }
    assert_eq!(firsts.len(), 2, "both orders of equal preferences occur");
    // port from host:port
    let hops = rt.block_on(resolve(&r, &Destination::parse("d.test:2525").unwrap(), &me)).unwrap();
    assert!(hops.iter().all(|h| h.addr.port() == 2525));
}

#[test]
fn mx_fallbacks_and_errors() {
    let rt = rt();
    let me = LocalIdentity { hostnames: vec!["me.test".into()], addrs: vec![ip("192.0.2.99")] };
    let mut r = StaticResolver::new();
    r.add_ip("plain.test", ip("192.0.2.7"))
        .add_mx("null.test", 0, ".")
        .add_mx("loop.test", 10, "me.test")
        .add_mx("loop.test", 20, "backup.test")
        .add_mx("loopip.test", 10, "other.test")
        .add_ip("other.test", ip("192.0.2.99"))
        .add_mx("backup-me.test", 10, "primary.test")
        .add_mx("backup-me.test", 20, "me.test")
        .add_mx("backup-me.test", 30, "tertiary.test")
        .add_ip("primary.test", ip("192.0.2.10"))
        .add_ip("tertiary.test", ip("192.0.2.30"))
        .add_ip("selfa.test", ip("192.0.2.99"))
        .fail_mx("tmp.test", DnsError::Temporary("SERVFAIL".into()))
        .add_mx("badmx.test", 10, "nowhere.test");
    let go = |d: &str| rt.block_on(resolve(&r, &Destination::parse(d).unwrap(), &me));
    // A fallback
    let hops = go("plain.test").unwrap();
    assert_eq!(hops[0].addr, SocketAddr::new(ip("192.0.2.7"), 25));
    assert_eq!(hops[0].preference, None);
    // null MX
    let e = go("null.test").unwrap_err();
    assert_eq!((e.code, e.enhanced), (556, Some((5, 1, 10))));
    // best MX is us (by name, by address), or the A fallback is us
    for d in ["loop.test", "loopip.test", "selfa.test"] {
        let e = go(d).unwrap_err();
        assert_eq!((e.code, e.enhanced), (554, Some((5, 4, 6))), "{d}");
        assert!(e.text.contains("loops back to myself"));
    }
    // we are a backup MX: only better ones are tried
    let hops = go("backup-me.test").unwrap();
    assert_eq!(hops.len(), 1);
    assert_eq!(hops[0].name, "primary.test");
    // [host] skips MX, [ip] needs no DNS
    assert_eq!(go("[plain.test]:587").unwrap()[0].addr.port(), 587);
    assert!(go("[loop.test]").is_err(), "no A record, no MX lookup");
    assert_eq!(go("[192.0.2.5]").unwrap()[0].addr.ip(), ip("192.0.2.5"));
    // errors
    let e = go("nx.test").unwrap_err();
    assert_eq!(e.enhanced, Some((5, 4, 4)));
    let e = go("tmp.test").unwrap_err();
    assert_eq!((e.code, e.enhanced), (451, Some((4, 4, 3))));
    let e = go("badmx.test").unwrap_err();
    assert_eq!(e.code / 100, 4, "unresolvable MX host: retry");
}

// ---------------------------------------------------------------- local

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "mailpolicy-transport-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn maildir_delivery() {
    let dir = TempDir::new("maildir");
    let md = dir.0.join("Maildir");
    let e = env("a@s.test", &["u@d.test"]);
    let p1 = local::deliver_maildir(&md, &e, b"Subject: one\r\n\r\nbody\r\n").unwrap();
    let p2 = local::deliver_maildir(&md, &e, b"Subject: two\n\nbody\n").unwrap();
    assert_ne!(p1, p2);
    for sub in ["cur", "new", "tmp"] {
        assert!(md.join(sub).is_dir());
    }
    assert_eq!(std::fs::read_dir(md.join("tmp")).unwrap().count(), 0);
    assert_eq!(std::fs::read_dir(md.join("new")).unwrap().count(), 2);
    let body = std::fs::read_to_string(&p1).unwrap();
    assert_eq!(body, "Return-Path: <a@s.test>\nDelivered-To: u@d.test\nSubject: one\n\nbody\n");
    let name = p1.file_name().unwrap().to_string_lossy().to_string();
    assert!(name.ends_with(&format!(",S={}", body.len())), "{name}");
    // through the driver
    let rep = rt().block_on(deliver(
        &Target::Maildir(crate::paths::Confined { root: None, path: md.clone() }),
        &e,
        b"x\n",
        &opts(StaticResolver::new()),
    ));
    assert!(matches!(&rep.recipients[0], DeliveryOutcome::Delivered(_)));
    // unwritable: deferred
    let rep = rt().block_on(deliver(
        &Target::Maildir(crate::paths::Confined { root: None, path: PathBuf::from("/proc/nonexistent/Maildir") }),
        &e,
        b"x\n",
        &opts(StaticResolver::new()),
    ));
    assert!(matches!(&rep.recipients[0], DeliveryOutcome::Deferred(_)), "{rep:?}");
}

#[test]
fn mbox_delivery() {
    let dir = TempDir::new("mbox");
    let mbox = dir.0.join("u");
    let e = env("a@s.test", &["u@d.test"]);
    local::deliver_mbox(&mbox, &e, b"Subject: one\r\n\r\nFrom here\r\n>From there\r\nx From y\r\n").unwrap();
    let bounce = Envelope { from: ReversePath::Null, ..e.clone() };
    local::deliver_mbox(&mbox, &bounce, b"Subject: two\n\nno newline at end").unwrap();
    let text = std::fs::read_to_string(&mbox).unwrap();
    let msgs: Vec<&str> = text.split("\nFrom ").collect();
    assert_eq!(msgs.len(), 2, "{text}");
    assert!(text.starts_with("From a@s.test "));
    assert!(msgs[1].starts_with("MAILER-DAEMON "));
    assert!(text.contains("\n>From here\n>>From there\nx From y\n\n"));
    assert!(text.ends_with("no newline at end\n\n"));
    assert!(!text.contains('\r'));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&mbox).unwrap().permissions().mode() & 0o777, 0o600);
    // concurrent appends serialise under the lock
    let handles: Vec<_> = (0..8)
        .map(|i| {
            let (m, e) = (mbox.clone(), e.clone());
            std::thread::spawn(move || {
                let body = format!("Subject: t{i}\n\n{}\n", "line\n".repeat(2000));
                local::deliver_mbox(&m, &e, body.as_bytes()).unwrap();
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let text = std::fs::read_to_string(&mbox).unwrap();
    assert_eq!(text.matches("\nFrom ").count() + 1, 10);
    for block in text.split("\nFrom a@s.test ").skip(1) {
        if block.contains("Subject: t") {
            assert_eq!(block.matches("line\n").count(), 2000);
        }
    }
}

// ---------------------------------------------------------------- DSN

/// Splits a multipart body into its parts (headers, body).
fn parse_dsn(msg: &[u8]) -> (String, Vec<(String, String)>) {
    let text = String::from_utf8(msg.to_vec()).unwrap();
    assert!(!text.replace("\r\n", "").contains('\n'), "CRLF only");
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let b = head.split("boundary=\"").nth(1).unwrap().split('"').next().unwrap().to_string();
    let end = format!("\r\n--{b}--\r\n");
    assert!(body.ends_with(&end));
    let parts = body
        .trim_end_matches(&end)
        .split(&format!("--{b}\r\n"))
        .skip(1)
        .map(|p| {
            let (h, b) = p.split_once("\r\n\r\n").unwrap();
            (h.to_string(), b.to_string())
        })
        .collect();
    (head.to_string(), parts)
}

fn field<'a>(block: &'a str, name: &str) -> Option<&'a str> {
    block.split("\r\n").find_map(|l| l.strip_prefix(&format!("{name}: ")))
}

#[test]
fn dsn_failure_structure() {
    let sender = parse_reverse_path("<alice@src.test>", false).unwrap();
    let original = b"From: alice@src.test\nSubject: hello\n\nbody line\n";
    let entries = vec![
        DsnRecipient::from_outcome(
            NoticeKind::Failure,
            "bob@dst.test",
            Some(&Orcpt { addr_type: "rfc822".into(), address: "Bob@dst.test".into() }),
            &DeliveryOutcome::Failed(Reply::new(550, (5, 1, 1), "<bob@dst.test>: user unknown\r\nInjected: x")),
            Some("mx.dst.test"),
            1_700_000_000_000,
        ),
        DsnRecipient::from_outcome(
            NoticeKind::Failure,
            "carol@dst.test",
            None,
            &DeliveryOutcome::Failed(Reply::plain(552, "quota exceeded")),
            None,
            1_700_000_000_000,
        ),
    ];
    let d = Dsn {
        kind: NoticeKind::Failure,
        hostname: "gw.src.test",
        sender: &sender,
        envid: Some("ENV-42"),
        ret: None,
        arrival_date: 1_699_990_000_000,
        now: 1_700_000_000_000,
        recipients: &entries,
        message: original,
        size_limit: 50_000,
        utf8: false,
    };
    let msg = build_dsn(&d);
    let (head, parts) = parse_dsn(&msg);
    assert_eq!(field(&head, "To"), Some("<alice@src.test>"));
    assert!(field(&head, "From").unwrap().starts_with("MAILER-DAEMON@gw.src.test"));
    assert!(head.contains("multipart/report; report-type=delivery-status"));
    assert_eq!(field(&head, "Auto-Submitted"), Some("auto-replied"));
    assert_eq!(parts.len(), 3);
    assert!(parts[0].0.contains("text/plain"));
    assert!(parts[0].1.contains("<bob@dst.test> (host mx.dst.test said): 550 5.1.1"));
    assert!(parts[1].0.contains("Content-Type: message/delivery-status"));
    let blocks: Vec<&str> = parts[1].1.split("\r\n\r\n").collect();
    assert_eq!(field(blocks[0], "Reporting-MTA"), Some("dns; gw.src.test"));
    assert_eq!(field(blocks[0], "Original-Envelope-Id"), Some("ENV-42"));
    assert!(field(blocks[0], "Arrival-Date").unwrap().contains("2023"));
    assert_eq!(field(blocks[1], "Original-Recipient"), Some("rfc822; Bob@dst.test"));
    assert_eq!(field(blocks[1], "Final-Recipient"), Some("rfc822; bob@dst.test"));
    assert_eq!(field(blocks[1], "Action"), Some("failed"));
    assert_eq!(field(blocks[1], "Status"), Some("5.1.1"));
    assert_eq!(field(blocks[1], "Remote-MTA"), Some("dns; mx.dst.test"));
    assert_eq!(field(blocks[1], "Diagnostic-Code"), Some("smtp; 550 5.1.1 <bob@dst.test>: user unknown  Injected: x"));
    assert!(field(blocks[1], "Last-Attempt-Date").is_some());
    assert!(field(blocks[1], "Will-Retry-Until").is_none());
    assert_eq!(field(blocks[2], "Status"), Some("5.0.0"));
    assert!(field(blocks[2], "Original-Recipient").is_none());
    assert!(!parts[1].1.contains("\r\nInjected:"), "no header injection");
    // failure without RET: the full original, CRLF
    assert!(parts[2].0.contains("Content-Type: message/rfc822"));
    assert_eq!(parts[2].1, "From: alice@src.test\r\nSubject: hello\r\n\r\nbody line\r\n");
}

#[test]
fn dsn_delay_headers_only_and_truncation() {
    let sender = parse_reverse_path("<alice@src.test>", false).unwrap();
    let mut original = b"Subject: big\r\nX-A: 1\r\n\r\n".to_vec();
    original.extend("0123456789\r\n".repeat(1000).as_bytes());
    let mut entry = DsnRecipient::from_outcome(
        NoticeKind::Delay,
        "bob@dst.test",
        None,
        &DeliveryOutcome::Deferred(Reply::new(451, (4, 4, 1), "connection refused")),
        None,
        1_700_000_000_000,
    );
    entry.will_retry_until = Some(1_700_400_000_000);
    let mut d = Dsn {
        kind: NoticeKind::Delay,
        hostname: "gw.src.test",
        sender: &sender,
        envid: None,
        ret: None,
        arrival_date: 1_699_990_000_000,
        now: 1_700_000_000_000,
        recipients: std::slice::from_ref(&entry),
        message: &original,
        size_limit: 50_000,
        utf8: false,
    };
    let (head, parts) = parse_dsn(&build_dsn(&d));
    assert!(field(&head, "Subject").unwrap().contains("Delayed"));
    let blocks: Vec<&str> = parts[1].1.split("\r\n\r\n").collect();
    assert_eq!(field(blocks[1], "Action"), Some("delayed"));
    assert_eq!(field(blocks[1], "Status"), Some("4.4.1"));
    assert!(field(blocks[1], "Will-Retry-Until").is_some());
    assert!(field(blocks[0], "Original-Envelope-Id").is_none());
    assert!(parts[2].0.contains("text/rfc822-headers"));
    assert_eq!(parts[2].1, "Subject: big\r\nX-A: 1\r\n");
    // RET=FULL cut to the limit at a line boundary
    d.ret = Some(Ret::Full);
    d.size_limit = 100;
    let (_, parts) = parse_dsn(&build_dsn(&d));
    assert!(parts[2].0.contains("message/rfc822"));
    assert!(parts[2].1.len() <= 100 && parts[2].1.ends_with("\r\n"));
    assert!(parts[0].1.contains("cut to 100 octets"));
    // a boundary-looking line in the original does not break the structure
    let b = format!("--=_{}.{}/gw.src.test\r\n", d.now, std::process::id());
    let tricky = format!("Subject: x\r\n\r\n{b}");
    d.message = tricky.as_bytes();
    d.size_limit = 50_000;
    let (_, parts) = parse_dsn(&build_dsn(&d));
    assert_eq!(parts.len(), 3);
    assert!(parts[2].1.contains(b.trim_end()));
}

#[test]
fn dsn_success_and_relayed() {
    let sender = parse_reverse_path("<alice@src.test>", false).unwrap();
    for (kind, action) in [(NoticeKind::Success, "delivered"), (NoticeKind::Relayed, "relayed")] {
        let e = DsnRecipient::from_outcome(
            kind,
            "bob@dst.test",
            None,
            &DeliveryOutcome::Delivered(Reply::new(250, (2, 0, 0), "ok")),
            Some("mx.dst.test"),
            1,
        );
        let d = Dsn {
            kind,
            hostname: "gw",
            sender: &sender,
            envid: None,
            ret: Some(Ret::Hdrs),
            arrival_date: 0,
            now: 1,
            recipients: std::slice::from_ref(&e),
            message: b"Subject: s\r\n\r\nbody\r\n",
            size_limit: 1000,
            utf8: false,
        };
        let (_, parts) = parse_dsn(&build_dsn(&d));
        let blocks: Vec<&str> = parts[1].1.split("\r\n\r\n").collect();
        assert_eq!(field(blocks[1], "Action"), Some(action));
        assert_eq!(field(blocks[1], "Status"), Some("2.0.0"));
        assert_eq!(parts[2].1, "Subject: s\r\n");
    }
}

#[test]
fn notify_rules() {
    let someone = parse_reverse_path("<a@s.test>", false).unwrap();
    let null = ReversePath::Null;
    let n = |s: bool, f: bool, d: bool| Notify { never: false, success: s, failure: f, delay: d };
    use NoticeKind::*;
    // never to the null sender
    for k in [Failure, Delay, Success, Relayed] {
        assert!(!should_notify(k, None, &null));
        assert!(!should_notify(k, Some(&n(true, true, true)), &null));
    }
    // no NOTIFY: failure and delay
    assert!(should_notify(Failure, None, &someone));
    assert!(should_notify(Delay, None, &someone));
    assert!(!should_notify(Success, None, &someone));
    assert!(!should_notify(Relayed, None, &someone));
    // NEVER
    let never = Notify { never: true, ..Default::default() };
    for k in [Failure, Delay, Success, Relayed] {
        assert!(!should_notify(k, Some(&never), &someone));
    }
    // only what was asked
    assert!(should_notify(Success, Some(&n(true, false, false)), &someone));
    assert!(should_notify(Relayed, Some(&n(true, false, false)), &someone));
    assert!(!should_notify(Failure, Some(&n(true, false, false)), &someone));
    assert!(!should_notify(Delay, Some(&n(false, true, false)), &someone));
    assert!(should_notify(Delay, Some(&n(false, false, true)), &someone));
}

/// Log lines name a target as an operator writes it (issue 11), not as a Rust structure.
#[test]
fn targets_display_for_operators() {
    use crate::transport::driver::{LmtpEndpoint, Target};
    use crate::transport::mx::Destination;
    assert_eq!(
        Target::Smtp(Destination { host: "10.0.0.5".into(), port: 25, mx: false }).to_string(),
        "smtp:[10.0.0.5]:25"
    );
    assert_eq!(Target::Smtp(Destination::domain("example.com")).to_string(), "smtp:example.com:25");
    assert_eq!(Target::Lmtp(LmtpEndpoint::Unix("/run/lmtp".into())).to_string(), "lmtp:unix:/run/lmtp");
    let m = crate::paths::Confined { root: None, path: "/var/mail/a".into() };
    assert_eq!(Target::Maildir(m).to_string(), "maildir:/var/mail/a");
}

/// RFC 6533: a report on an SMTPUTF8 message uses the global media types; the ENVID is
/// written as xtext (RFC 3461 4.4), as it came on MAIL.
#[test]
fn dsn_for_smtputf8_mail_is_global_and_envid_is_xtext() {
    let sender = parse_reverse_path("<j\u{f6}rg@src.test>", true).unwrap();
    let e = DsnRecipient::from_outcome(
        NoticeKind::Failure,
        "b\u{fc}ro@dst.test",
        None,
        &DeliveryOutcome::Failed(Reply::new(550, (5, 1, 1), "no such user")),
        Some("mx.dst.test"),
        1,
    );
    let entries = [e];
    assert!(Dsn::needs_global(false, &sender, &entries));
    let ascii = parse_reverse_path("<a@src.test>", false).unwrap();
    let plain = [DsnRecipient::from_outcome(
        NoticeKind::Failure,
        "b@dst.test",
        None,
        &DeliveryOutcome::Failed(Reply::new(550, (5, 1, 1), "no")),
        None,
        1,
    )];
    assert!(!Dsn::needs_global(false, &ascii, &plain));
    assert!(Dsn::needs_global(true, &ascii, &plain));
    let original = "Subject: gr\u{fc}\u{df}e\r\nFrom: j\u{f6}rg@src.test\r\n\r\nbody\r\n";
    for (ret, returned) in [(Some(Ret::Full), "message/global"), (Some(Ret::Hdrs), "message/global-headers")] {
        let d = Dsn {
            kind: NoticeKind::Failure,
            hostname: "gw",
            sender: &sender,
            envid: Some("id 1+x=\u{e9}"),
            ret,
            arrival_date: 0,
            now: 1,
            recipients: &entries,
            message: original.as_bytes(),
            size_limit: 1000,
            utf8: true,
        };
        let msg = build_dsn(&d);
        let (head, parts) = parse_dsn(&msg);
        assert!(head.contains("report-type=delivery-status"), "{head}");
        assert_eq!(field(&head, "Content-Transfer-Encoding"), Some("8bit"));
        assert!(parts[1].0.contains("Content-Type: message/global-delivery-status"), "{}", parts[1].0);
        let blocks: Vec<&str> = parts[1].1.split("\r\n\r\n").collect();
        assert_eq!(field(blocks[0], "Original-Envelope-Id"), Some("id+201+2Bx+3D+C3+A9"));
        assert_eq!(field(blocks[1], "Final-Recipient"), Some("utf-8; b\u{fc}ro@dst.test"));
        assert_eq!(field(&parts[2].0, "Content-Type"), Some(returned));
        assert!(parts[2].1.contains("gr\u{fc}\u{df}e"));
    }
}
