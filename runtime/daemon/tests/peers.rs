//! The daemon's transport driver against real peers on loopback ports of their own:
//! Postfix's smtp-sink (with fault injection), a scripted TLS server, Dovecot LMTP over
//! TCP and a unix socket, hickory against unbound; and the daemon's other real peers:
//! PostgreSQL and OpenLDAP tables, SpamAssassin's spamd, SPF/DKIM/DMARC against unbound.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use mailpolicy_daemon::transport::client::*;
use mailpolicy_daemon::transport::driver::*;
use mailpolicy_daemon::transport::mx::*;
use mailpolicy_engine::smtp::{
    parse_forward_path, parse_reverse_path, Envelope, MailParams, RcptParams, Recipient, Reply,
};
use std::collections::HashMap;

use base64::Engine as _;
use mail_auth::common::crypto::Ed25519Key;
use mailpolicy_daemon::auth::AuthState;
use mailpolicy_daemon::scan::spamd;
use mailpolicy_engine::eval::Answer;
use mailpolicy_test_support::{free_port, Dovecot, Peer, Postgres, Slapd, Spamd, TempDir, Unbound};
use tokio_postgres::NoTls;

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

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

fn opts(resolver: StaticResolver) -> DeliveryOptions {
    let mut o = DeliveryOptions::new("client.test", Arc::new(resolver));
    o.timeouts = Timeouts::all(Duration::from_secs(5));
    o.tls = TlsPolicy::None;
    o
}

fn localhost_resolver() -> StaticResolver {
    let mut r = StaticResolver::new();
    r.add_ip("localhost", IpAddr::V4(Ipv4Addr::LOCALHOST));
    r
}

// ---------------------------------------------------------------- real peers

const SMTP_SINK: &str = "/usr/sbin/smtp-sink";

/// Starts smtp-sink with `args` on `where_` (`127.0.0.1:PORT` or `unix:PATH`).
fn smtp_sink(args: &[&str], where_: &str) -> Peer {
    assert!(
        std::path::Path::new(SMTP_SINK).exists(),
        "{SMTP_SINK} not found: it comes with Debian's postfix package; run tests/run.sh, which installs the test peers"
    );
    let mut cmd = Command::new(SMTP_SINK);
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        cmd.args(["-u", "nobody"]);
    }
    let child = cmd
        .args(args)
        .arg(where_)
        .arg("10")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start smtp-sink");
    let peer = Peer(child);
    for _ in 0..200 {
        let up = if let Some(p) = where_.strip_prefix("unix:") {
            std::os::unix::net::UnixStream::connect(p).is_ok()
        } else {
            std::net::TcpStream::connect(where_).is_ok()
        };
        if up {
            // that probe was a session too; smtp-sink shrugs it off
            return peer;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("smtp-sink did not come up on {where_}");
}

#[test]
fn smtp_sink_delivery_and_fault_injection() {
    let rt = rt();
    let msg = b"From: a@src.test\nSubject: hi\n\n.leading dot\nbody\n";
    let e = env("a@src.test", &["b@dst.test", "c@dst.test"]);

    let port = free_port();
    let _sink = smtp_sink(&[], &format!("127.0.0.1:{port}"));
    let o = opts(localhost_resolver());
    let target = Target::Smtp(Destination::parse(&format!("[127.0.0.1]:{port}")).unwrap());
    let rep = rt.block_on(deliver(&target, &e, msg, &o));
    assert!(rep.recipients.iter().all(|o| matches!(o, DeliveryOutcome::Delivered(r) if r.code == 250)), "{rep:?}");
    assert!(rep.remote_mta.unwrap().contains(&port.to_string()));

    // 4xx on RCPT: deferred; 5xx on RCPT: failed; 5xx on MAIL: failed
    for (args, want_code) in [
        (&["-r", "rcpt"][..], 4),
        (&["-f", "rcpt"][..], 5),
        (&["-f", "mail"][..], 5),
        (&["-r", "data"][..], 4),
        (&["-f", "."][..], 5),
    ] {
        let port = free_port();
        let _sink = smtp_sink(args, &format!("127.0.0.1:{port}"));
        let target = Target::Smtp(Destination::parse(&format!("[127.0.0.1]:{port}")).unwrap());
        let rep = rt.block_on(deliver(&target, &e, msg, &o));
        for oc in &rep.recipients {
            assert_eq!(oc.reply().code / 100, want_code, "{args:?}: {rep:?}");
            match want_code {
                4 => assert!(matches!(oc, DeliveryOutcome::Deferred(_))),
                _ => assert!(matches!(oc, DeliveryOutcome::Failed(_))),
            }
        }
    }

    // disconnect without a reply: deferred with a made-up 4.4.2
    let port = free_port();
    let _sink = smtp_sink(&["-q", "rcpt"], &format!("127.0.0.1:{port}"));
    let target = Target::Smtp(Destination::parse(&format!("[127.0.0.1]:{port}")).unwrap());
    let rep = rt.block_on(deliver(&target, &e, msg, &o));
    for oc in &rep.recipients {
        assert!(matches!(oc, DeliveryOutcome::Deferred(r) if r.enhanced == Some((4, 4, 2))), "{rep:?}");
    }

    // EHLO refused: HELO fallback still delivers; no DSN at the next hop
    let port = free_port();
    let _sink = smtp_sink(&["-f", "ehlo"], &format!("127.0.0.1:{port}"));
    let target = Target::Smtp(Destination::parse(&format!("[127.0.0.1]:{port}")).unwrap());
    let rep = rt.block_on(deliver(&target, &e, msg, &o));
    assert!(rep.recipients.iter().all(|o| matches!(o, DeliveryOutcome::Delivered(_))), "{rep:?}");
    assert!(!rep.next_hop_dsn);

    // nothing listening: deferred 4.4.1
    let target = Target::Smtp(Destination::parse(&format!("[127.0.0.1]:{}", free_port())).unwrap());
    let rep = rt.block_on(deliver(&target, &e, msg, &o));
    assert!(matches!(&rep.recipients[0], DeliveryOutcome::Deferred(r) if r.enhanced == Some((4, 4, 1))));
}

#[test]
fn smtp_sink_tls_required_is_deferred_when_not_offered() {
    let rt = rt();
    let port = free_port();
    let _sink = smtp_sink(&[], &format!("127.0.0.1:{port}"));
    let mut o = opts(localhost_resolver());
    o.tls = TlsPolicy::Required;
    let target = Target::Smtp(Destination::parse(&format!("[127.0.0.1]:{port}")).unwrap());
    let rep = rt.block_on(deliver(&target, &env("a@s.test", &["b@d.test"]), b"x\n", &o));
    assert!(matches!(&rep.recipients[0], DeliveryOutcome::Deferred(r) if r.enhanced == Some((4, 7, 4))), "{rep:?}");
    // may: delivered in clear
    o.tls = TlsPolicy::May;
    let rep = rt.block_on(deliver(&target, &env("a@s.test", &["b@d.test"]), b"x\n", &o));
    assert!(matches!(&rep.recipients[0], DeliveryOutcome::Delivered(_)), "{rep:?}");
    assert!(!rep.tls);
}

#[test]
fn smtp_sink_mx_next_host_and_connection_cache() {
    let rt = rt();
    let port = free_port();
    // -n 2: smtp-sink exits after two sessions (the readiness probe and
    // ours), so later messages can only go through the cached session
    let _sink = smtp_sink(&["-n", "2"], &format!("127.0.0.1:{port}"));
    let mut r = StaticResolver::new();
    // mx1 (best) has nothing listening on 127.0.0.2:port
    r.add_mx("dst.test", 10, "mx1.dst.test")
        .add_mx("dst.test", 20, "mx2.dst.test")
        .add_ip("mx1.dst.test", ip("127.0.0.2"))
        .add_ip("mx2.dst.test", ip("127.0.0.1"));
    let mut o = opts(r);
    let cache = Arc::new(ConnectionCache::new(Duration::from_secs(30)));
    o.cache = Some(cache.clone());
    let target = Target::Smtp(Destination::parse(&format!("dst.test:{port}")).unwrap());
    let e = env("a@s.test", &["b@dst.test"]);
    for i in 0..3 {
        let rep = rt.block_on(deliver(&target, &e, format!("Subject: {i}\n\nx\n").as_bytes(), &o));
        assert!(matches!(&rep.recipients[0], DeliveryOutcome::Delivered(_)), "message {i}: {rep:?}");
        assert_eq!(rep.remote_host.as_deref(), Some("mx2.dst.test"));
        assert_eq!(cache.len(), 1);
    }
    // call-ahead on the same cached session
    let from = parse_reverse_path("<>", false).unwrap();
    let to = parse_forward_path("<b@dst.test>", false).unwrap();
    let dest = Destination::parse(&format!("dst.test:{port}")).unwrap();
    let reply = rt.block_on(call_ahead(&dest, &from, &to, &o));
    assert_eq!(reply.code, 250);
    rt.block_on(cache.close_all(&o.timeouts));
    assert!(cache.is_empty());
}

/// A loopback proxy to `to` that counts the connections made through it.
async fn counting_proxy(to: u16) -> (u16, Arc<std::sync::atomic::AtomicUsize>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = l.local_addr().expect("addr").port();
    let n = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = n.clone();
    tokio::spawn(async move {
        while let Ok((mut a, _)) = l.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                if let Ok(mut b) = tokio::net::TcpStream::connect(("127.0.0.1", to)).await {
                    let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
                }
            });
        }
    });
    (port, n)
}

/// Several messages per session (RSET between them), as many as `max_uses` allows; a
/// session is not reused past `max_age`, nor for a delivery under other TLS settings.
#[test]
fn connection_cache_reuse_limits() {
    use std::sync::atomic::Ordering::SeqCst;
    let rt = rt();
    let sink = free_port();
    let _sink = smtp_sink(&[], &format!("127.0.0.1:{sink}"));
    let (port, sessions) = rt.block_on(counting_proxy(sink));
    let mut o = opts(localhost_resolver());
    let mut cache = ConnectionCache::new(Duration::from_secs(30));
    cache.max_uses = 2;
    let cache = Arc::new(cache);
    o.cache = Some(cache.clone());
    let target = Target::Smtp(Destination::parse(&format!("[127.0.0.1]:{port}")).unwrap());
    let e = env("a@s.test", &["b@dst.test"]);
    let send = |o: &DeliveryOptions, i: usize| {
        let rep = rt.block_on(deliver(&target, &e, format!("Subject: {i}\n\nx\n").as_bytes(), o));
        assert!(matches!(&rep.recipients[0], DeliveryOutcome::Delivered(_)), "message {i}: {rep:?}");
    };
    for i in 0..5 {
        send(&o, i);
    }
    // 2 + 2 + 1 messages: three sessions, two of them reused once each.
    assert_eq!((sessions.load(SeqCst), cache.reused()), (3, 2));
    // Another TLS policy is another key: the idle session does not serve it.
    let mut may = o.clone();
    may.tls = TlsPolicy::May;
    send(&may, 5);
    assert_eq!(sessions.load(SeqCst), 4);
    send(&may, 6);
    assert_eq!((sessions.load(SeqCst), cache.reused()), (4, 3));
    rt.block_on(cache.close_all(&o.timeouts));
    // No reuse once a session is older than max_age.
    let mut cache = ConnectionCache::new(Duration::from_secs(30));
    cache.max_age = Duration::ZERO;
    let cache = Arc::new(cache);
    o.cache = Some(cache.clone());
    for i in 0..2 {
        send(&o, i);
    }
    assert_eq!((sessions.load(SeqCst), cache.reused(), cache.len()), (6, 0, 0));
}

#[test]
fn smtp_sink_call_ahead_refused() {
    let rt = rt();
    let port = free_port();
    let _sink = smtp_sink(&["-f", "rcpt"], &format!("127.0.0.1:{port}"));
    let o = opts(localhost_resolver());
    let from = parse_reverse_path("<>", false).unwrap();
    let to = parse_forward_path("<b@dst.test>", false).unwrap();
    let dest = Destination::parse(&format!("[127.0.0.1]:{port}")).unwrap();
    let reply = rt.block_on(call_ahead(&dest, &from, &to, &o));
    assert_eq!(reply.code / 100, 5, "{reply:?}");
}

#[test]
fn smtp_sink_lmtp_tcp_and_unix() {
    let rt = rt();
    let e = env("a@s.test", &["u1@d.test", "u2@d.test"]);
    let o = opts(localhost_resolver());
    let port = free_port();
    let _sink = smtp_sink(&["-L"], &format!("127.0.0.1:{port}"));
    let target = Target::parse(&format!("lmtp:inet:[127.0.0.1]:{port}")).unwrap();
    let rep = rt.block_on(deliver(&target, &e, b"Subject: l\n\nbody\n", &o));
    assert!(rep.recipients.iter().all(|o| matches!(o, DeliveryOutcome::Delivered(_))), "{rep:?}");

    let dir = TempDir::new("lmtp");
    let sock = dir.0.join("lmtp.sock");
    let _sink = smtp_sink(&["-L"], &format!("unix:{}", sock.display()));
    let target = Target::Lmtp(LmtpEndpoint::Unix(sock.clone()));
    let rep = rt.block_on(deliver(&target, &e, b"Subject: l\n\nbody\n", &o));
    assert!(rep.recipients.iter().all(|o| matches!(o, DeliveryOutcome::Delivered(_))), "{rep:?}");

    let port = free_port();
    let _sink = smtp_sink(&["-L", "-r", "."], &format!("127.0.0.1:{port}"));
    let target = Target::parse(&format!("lmtp:[127.0.0.1]:{port}")).unwrap();
    let rep = rt.block_on(deliver(&target, &e, b"x\n", &o));
    assert!(rep.recipients.iter().all(|o| matches!(o, DeliveryOutcome::Deferred(_))), "{rep:?}");
}

// ------------------------------------------------- scripted TLS server

/// A tiny SMTP server offering STARTTLS with an rcgen certificate for
/// `localhost`; accepts everything and records the message data.
async fn tls_server(
    listener: tokio::net::TcpListener,
    cert_der: Vec<u8>,
    key_der: Vec<u8>,
    sessions: usize,
) -> Vec<(bool, Vec<u8>)> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let der = rustls::pki_types::CertificateDer::from(cert_der);
    let key = rustls::pki_types::PrivateKeyDer::try_from(key_der).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![der], key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let mut got = Vec::new();
    for _ in 0..sessions {
        let (mut s, _) = listener.accept().await.unwrap();
        s.write_all(b"220 tls.test ESMTP\r\n").await.unwrap();
        let mut r = BufReader::new(s);
        let mut line = String::new();
        r.read_line(&mut line).await.unwrap();
        r.get_mut().write_all(b"250-tls.test\r\n250-PIPELINING\r\n250 STARTTLS\r\n").await.unwrap();
        line.clear();
        r.read_line(&mut line).await.unwrap();
        assert_eq!(line, "STARTTLS\r\n");
        r.get_mut().write_all(b"220 2.0.0 go\r\n").await.unwrap();
        let tls = match acceptor.accept(r.into_inner()).await {
            Ok(t) => t,
            Err(_) => {
                got.push((false, Vec::new()));
                continue;
            }
        };
        let mut r = BufReader::new(tls);
        let mut data = Vec::new();
        let mut in_data = false;
        loop {
            let mut l = Vec::new();
            if r.read_until(b'\n', &mut l).await.unwrap_or(0) == 0 {
                break;
            }
            if in_data {
                if l == b".\r\n" {
                    in_data = false;
                    r.get_mut().write_all(b"250 2.0.0 ok\r\n").await.unwrap();
                } else {
                    data.extend_from_slice(&l);
                }
                continue;
            }
            let up = String::from_utf8_lossy(&l).to_ascii_uppercase();
            let reply: &[u8] = if up.starts_with("EHLO") {
                b"250-tls.test\r\n250 PIPELINING\r\n"
            } else if up.starts_with("DATA") {
                in_data = true;
                b"354 go\r\n"
            } else if up.starts_with("QUIT") {
                let _ = r.get_mut().write_all(b"221 bye\r\n").await;
                break;
            } else {
                b"250 ok\r\n"
            };
            r.get_mut().write_all(reply).await.unwrap();
        }
        got.push((true, data));
    }
    got
}

#[test]
fn starttls_may_and_required_against_a_tls_server() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(rustls::pki_types::CertificateDer::from(cert.cert.der().to_vec())).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(tls_server(listener, cert.cert.der().to_vec(), cert.key_pair.serialize_der(), 3));
        let e = env("a@s.test", &["b@d.test"]);
        let target = Target::Smtp(Destination::parse(&format!("[localhost]:{port}")).unwrap());
        // may: self-signed accepted, encrypted
        let mut o = opts(localhost_resolver());
        o.tls = TlsPolicy::May;
        let rep = deliver(&target, &e, b"Subject: tls\n\nsecret\n", &o).await;
        assert!(matches!(&rep.recipients[0], DeliveryOutcome::Delivered(_)), "{rep:?}");
        assert!(rep.tls);
        // required with the webpki roots: the self-signed cert fails, deferred 4.7.5
        o.tls = TlsPolicy::Required;
        let rep = deliver(&target, &e, b"x\n", &o).await;
        assert!(matches!(&rep.recipients[0], DeliveryOutcome::Deferred(r) if r.enhanced == Some((4, 7, 5))), "{rep:?}");
        // required with our root and the right name: delivered
        o.tls_roots = Some(Arc::new(roots));
        let rep = deliver(&target, &e, b"x\n", &o).await;
        assert!(matches!(&rep.recipients[0], DeliveryOutcome::Delivered(_)), "{rep:?}");
        assert!(rep.tls);
        let got = server.await.unwrap();
        assert_eq!(got[0], (true, b"Subject: tls\r\n\r\nsecret\r\n".to_vec()));
        assert!(!got[1].0, "handshake refused by the client");
        assert!(got[2].0);
    });
}

// ---------------------------------------------------------------- Dovecot

#[test]
fn dovecot_lmtp_tcp_and_unix_per_recipient() {
    let dv = Dovecot::start();
    let rt = rt();
    let o = opts(StaticResolver::new());
    let e = env("a@s.test", &["u1@d.test", "nosuchuser@d.test"]);
    let targets = [
        Target::parse(&format!("lmtp:[127.0.0.1]:{}", dv.port)).unwrap(),
        Target::Lmtp(LmtpEndpoint::Unix(dv.socket.clone())),
    ];
    for (i, t) in targets.iter().enumerate() {
        let msg = format!("Subject: via {i}\n\n.dot line\nbody\n");
        let rep = rt.block_on(deliver(t, &e, msg.as_bytes(), &o));
        assert!(matches!(&rep.recipients[0], DeliveryOutcome::Delivered(r) if r.code == 250), "{rep:?}");
        assert!(matches!(&rep.recipients[1], DeliveryOutcome::Failed(r) if r.enhanced == Some((5, 1, 1))), "{rep:?}");
    }
    let new = dv.mail.join("new");
    let bodies: Vec<String> =
        std::fs::read_dir(&new).unwrap().map(|f| std::fs::read_to_string(f.unwrap().path()).unwrap()).collect();
    assert_eq!(bodies.len(), 2);
    for i in 0..2 {
        assert!(bodies.iter().any(|b| b.contains(&format!("Subject: via {i}\n"))));
    }
    for b in &bodies {
        assert!(b.contains("\n.dot line"), "dot-unstuffed by Dovecot: {b}");
        assert!(b.contains("Return-Path: <a@s.test>"), "{b}");
    }
}

// ---------------------------------------------------------------- unbound

#[test]
fn hickory_resolver_against_unbound() {
    let ub = Unbound::start(
        &["ub.test."],
        &[
            "ub.test. IN MX 20 mx2.ub.test.",
            "ub.test. IN MX 10 mx1.ub.test.",
            "mx1.ub.test. IN A 127.0.0.1",
            "mx2.ub.test. IN A 127.0.0.2",
            "null.ub.test. IN MX 0 .",
            "amx.ub.test. IN A 127.0.0.3",
        ],
        &[],
    );
    let port = ub.port;
    let rt = rt();
    rt.block_on(async {
        let r = HickoryResolver::with_nameserver(SocketAddr::new(ip("127.0.0.1"), port));
        let me = LocalIdentity::default();
        let mut hops = Err(Reply::plain(451, "not tried"));
        for _ in 0..50 {
            hops = resolve(&r, &Destination::domain("ub.test"), &me).await;
            if hops.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let hops = hops.expect("unbound answers");
        let got: Vec<(&str, IpAddr, Option<u16>)> =
            hops.iter().map(|h| (h.name.as_str(), h.addr.ip(), h.preference)).collect();
        assert_eq!(got, vec![("mx1.ub.test", ip("127.0.0.1"), Some(10)), ("mx2.ub.test", ip("127.0.0.2"), Some(20))]);
        let e = resolve(&r, &Destination::domain("null.ub.test"), &me).await.unwrap_err();
        assert_eq!(e.enhanced, Some((5, 1, 10)));
        let e = resolve(&r, &Destination::domain("nx.ub.test"), &me).await.unwrap_err();
        assert_eq!((e.code, e.enhanced), (550, Some((5, 4, 4))));
        let hops = resolve(&r, &Destination::domain("amx.ub.test"), &me).await.unwrap();
        assert_eq!(hops[0].addr.ip(), ip("127.0.0.3"), "A fallback");
        let me = LocalIdentity { hostnames: vec![], addrs: vec![ip("127.0.0.1")] };
        let e = resolve(&r, &Destination::domain("ub.test"), &me).await.unwrap_err();
        assert_eq!(e.enhanced, Some((5, 4, 6)));
    });
}

// ---------------------------------------------------------------- tables, scanners, sender authentication

/// A real PostgreSQL (Debian package postgresql, installed by tests/run.sh) started by
/// the test in a temp dir on a loopback port of its own.
#[tokio::test]
async fn postgresql_table() {
    let server = Postgres::start();
    let url = server.url.clone();
    let (client, conn) = tokio_postgres::connect(&url, NoTls).await.expect("connect");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
        .batch_execute("CREATE TABLE mailboxes (address text PRIMARY KEY, host text, quota bigint); INSERT INTO mailboxes VALUES ('alice@example.com', 'mbox1.internal', 1024), ('bob@example.com', NULL, 0);")
        .await
        .expect("create table");
    let policy = format!(
        "table boxes = sql {{ url \"{url}\"; query \"SELECT host FROM mailboxes WHERE address = lower($1)\"; }};\n\
         table quota = sql {{ url \"{url}\"; query \"SELECT quota FROM mailboxes WHERE address = $1\"; }};\n\
         table broken = sql {{ url \"{url}\"; query \"SELECT nope FROM nowhere WHERE x = $1\"; }};\n\
         table slow = sql {{ url \"{url}\"; query \"SELECT $1::text FROM pg_sleep(0.3)\"; connections 3; }};\n\
         on rcpt {{ if recipient in boxes or recipient in quota or recipient in broken or recipient in slow {{ accept; }} }}\n"
    );
    let c = mailpolicy_lang::compile("p.mailpolicy", &mailpolicy_lang::MemLoader::single("p.mailpolicy", &policy));
    let prog = c.program.expect("policy compiles");
    let pool = mailpolicy_daemon::sql::Pool::default();
    let none = HashMap::new();
    let t = Duration::from_secs(5);
    assert_eq!(
        pool.lookup(&prog, sql_table(&prog.tables[0], t), "Alice@Example.com", &none).await,
        Answer::Value(Some("mbox1.internal".into()))
    );
    assert_eq!(
        pool.lookup(&prog, sql_table(&prog.tables[0], t), "bob@example.com", &none).await,
        Answer::Value(Some(String::new()))
    );
    assert_eq!(
        pool.lookup(&prog, sql_table(&prog.tables[0], t), "nobody@example.com", &none).await,
        Answer::Value(None)
    );
    // The key is a parameter, never SQL.
    assert_eq!(pool.lookup(&prog, sql_table(&prog.tables[0], t), "x' OR '1'='1", &none).await, Answer::Value(None));
    assert_eq!(
        pool.lookup(&prog, sql_table(&prog.tables[1], t), "alice@example.com", &none).await,
        Answer::Value(Some("1024".into()))
    );
    // The error says what the server said, not only "db error".
    match pool.lookup(&prog, sql_table(&prog.tables[2], t), "alice@example.com", &none).await {
        Answer::Error(e) => assert!(e.contains("ERROR") && e.contains("nowhere"), "{e}"),
        other => panic!("{other:?}"),
    }
    // One connection served every lookup of a table, one after the other; the failed query
    // dropped its connection.
    assert_eq!((pool.idle("boxes"), pool.idle("quota"), pool.idle("broken")), (1, 1, 0));
    // Lookups at once run on connections of their own, up to the table's `connections`
    // (they do not queue behind one connection), and the connections are kept.
    let slow = &prog.tables[3];
    let keys: Vec<String> = (0..7).map(|i| format!("k{i}")).collect();
    let answers =
        futures_util::future::join_all(keys.iter().map(|k| pool.lookup(&prog, sql_table(slow, t), k, &none))).await;
    assert_eq!(answers, keys.iter().map(|k| Answer::Value(Some(k.clone()))).collect::<Vec<_>>());
    assert_eq!(pool.idle("slow"), 3);
    drop(server);
    // The server is gone: an error, never "absent".
    assert!(matches!(
        pool.lookup(&prog, sql_table(&prog.tables[0], Duration::from_secs(2)), "alice@example.com", &none).await,
        Answer::Error(_) | Answer::Timeout
    ));
}

fn sql_table(t: &mailpolicy_lang::ir::Resource, timeout: Duration) -> mailpolicy_daemon::sql::SqlTable<'_> {
    mailpolicy_daemon::sql::SqlTable::of(t, timeout, mailpolicy_lang::resources::Options::sql).expect("an sql table")
}

fn ldap_table(t: &mailpolicy_lang::ir::Resource, timeout: Duration) -> mailpolicy_daemon::ldap::LdapTable<'_> {
    mailpolicy_daemon::ldap::LdapTable::of(t, timeout, mailpolicy_lang::resources::Options::ldap)
        .expect("an ldap table")
}

/// PostgreSQL over TLS (the url's `sslmode`, `sslrootcert`): a server with a self-signed
/// certificate for `pg.test` that refuses connections in clear, and each mode against it.
/// The query answers the server's own view of the session (`pg_stat_ssl`).
#[tokio::test]
async fn postgresql_over_tls() {
    let certs = TempDir::new("pg-certs");
    let (cert, key) = mailpolicy_daemon::tls::self_signed(&certs.join("server"), "pg.test").expect("certificate");
    let (other, _) = mailpolicy_daemon::tls::self_signed(&certs.join("other"), "pg.test").expect("certificate");
    let server = Postgres::start_tls(&cert, &key);
    let (url, port) = (server.url.clone(), server.port);
    let (cert, other) = (cert.display().to_string(), other.display().to_string());
    let urls = [
        format!("{url}?sslmode=require"),
        url.clone(),
        format!("{url}?sslmode=disable"),
        format!("{url}?sslmode=verify-ca&sslrootcert={cert}"),
        // The certificate is for pg.test, not 127.0.0.1.
        format!("{url}?sslmode=verify-full&sslrootcert={cert}"),
        // Relative to the policy's directory (the pool's).
        format!("host=pg.test hostaddr=127.0.0.1 port={port} user=mail dbname=postgres sslmode=verify-full sslrootcert=server/cert.pem"),
        format!("{url}?sslmode=verify-ca&sslrootcert={other}"),
        // libpq: `require` with a root certificate verifies the chain.
        format!("{url}?sslmode=require&sslrootcert={other}"),
    ];
    let mut policy = String::new();
    for (i, u) in urls.iter().enumerate() {
        policy.push_str(&format!(
            "table t{i} = sql {{ url \"{u}\"; query \"SELECT ssl::text FROM pg_stat_ssl WHERE pid = pg_backend_pid() AND $1 <> ''\"; }};\n"
        ));
    }
    policy.push_str("on rcpt { if ");
    policy.push_str(&(0..urls.len()).map(|i| format!("recipient in t{i}")).collect::<Vec<_>>().join(" or "));
    policy.push_str(" { accept; } }\n");
    let c = mailpolicy_lang::compile("p.mailpolicy", &mailpolicy_lang::MemLoader::single("p.mailpolicy", &policy));
    let prog = c.program.unwrap_or_else(|| panic!("policy compiles: {:?}", c.diagnostics));
    let pool = mailpolicy_daemon::sql::Pool::new(certs.path());
    let none = HashMap::new();
    let t = Duration::from_secs(5);
    let mut got = Vec::new();
    for table in &prog.tables {
        got.push(match pool.lookup(&prog, sql_table(table, t), "k", &none).await {
            Answer::Value(v) => format!("{v:?}"),
            Answer::Error(e) => {
                eprintln!("{}: {e}", table.name);
                "error".into()
            }
            other => format!("{other:?}"),
        });
    }
    let tls = "Some(\"true\")".to_string();
    let err = "error".to_string();
    assert_eq!(got, vec![tls.clone(), tls.clone(), err.clone(), tls.clone(), err.clone(), tls, err.clone(), err]);
}

/// OpenLDAP's slapd (Debian package slapd, installed by tests/run.sh) with the seed's
/// schema (`inetLocalMailRecipient`: mailLocalAddress, mailHost from misc.schema),
/// started by the test on a loopback port of its own.
#[tokio::test]
async fn slapd_directory() {
    let ldif = "dn: dc=example,dc=com\nobjectClass: dcObject\nobjectClass: organization\ndc: example\no: Example\n\n\
                dn: uid=alice,dc=example,dc=com\nobjectClass: inetOrgPerson\nobjectClass: inetLocalMailRecipient\nuid: alice\ncn: Alice\nsn: A\nmailLocalAddress: alice@example.com\nmailLocalAddress: a.smith@example.com\nmailHost: mbox1.internal.example\n";
    let server = Slapd::start("dc=example,dc=com", ldif);
    let port = server.port;
    let c = mailpolicy_lang::compile(
        "t.mailpolicy",
        &mailpolicy_lang::MemLoader::single(
            "t.mailpolicy",
            &format!(
                "table directory = ldap {{ url \"ldap://127.0.0.1:{port}\"; base \"dc=example,dc=com\"; filter \"(mailLocalAddress=%s)\"; attribute \"mailHost\"; }};\n\
                 table down = ldap {{ url \"ldap://127.0.0.1:1\"; base \"dc=example,dc=com\"; filter \"(mail=%s)\"; timeout 2s; }};\n\
                 on rcpt {{ if recipient in directory {{ accept; }} if recipient in down {{ accept; }} }}\n"
            ),
        ),
    );
    let prog = c.program.expect("policy compiles");
    let t = &prog.tables[0];
    let none = HashMap::new();
    let pool = mailpolicy_daemon::ldap::Pool::default();
    let lookup = |p, t, k, n, d| pool.lookup(p, ldap_table(t, d), k, n);
    let mut answer = Answer::Error("not started".into());
    for _ in 0..100 {
        answer = lookup(&prog, t, "alice@example.com", &none, Duration::from_secs(5)).await;
        if !matches!(answer, Answer::Error(_)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(answer, Answer::Value(Some("mbox1.internal.example".into())));
    assert_eq!(
        lookup(&prog, t, "A.Smith@example.com", &none, Duration::from_secs(5)).await,
        Answer::Value(Some("mbox1.internal.example".into()))
    );
    assert_eq!(lookup(&prog, t, "nobody@example.com", &none, Duration::from_secs(5)).await, Answer::Value(None));
    // Injection attempt: the filter stays one equality test.
    assert_eq!(lookup(&prog, t, "*", &none, Duration::from_secs(5)).await, Answer::Value(None));
    // The lookups used one connection, opened and bound once (none failed after the
    // directory answered); lookups at once use at most `connections` (default 4).
    let before = pool.opened();
    let keys: Vec<String> = (0..12).map(|i| format!("user{i}@example.com")).collect();
    let answers = futures_util::future::join_all(
        keys.iter().map(|k| pool.lookup(&prog, ldap_table(t, Duration::from_secs(5)), k, &none)),
    )
    .await;
    assert!(answers.iter().all(|a| *a == Answer::Value(None)), "{answers:?}");
    assert!(pool.opened() - before <= 4, "{} connections for 12 lookups", pool.opened() - before);
    assert_eq!(
        lookup(&prog, t, "alice@example.com", &none, Duration::from_secs(5)).await,
        Answer::Value(Some("mbox1.internal.example".into()))
    );
    // A directory that is down is an error, never a "not found".
    assert!(matches!(
        lookup(&prog, &prog.tables[1], "alice@example.com", &none, Duration::from_secs(5)).await,
        Answer::Error(_) | Answer::Timeout
    ));
}

#[tokio::test]
async fn real_spamd_scores_gtube() {
    let server = Spamd::start();
    let addr = server.addr.clone();
    let gtube = b"From: a@example.net\r\nTo: b@example.com\r\nSubject: test\r\n\r\nXJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X\r\n";
    let mut score = Err(String::from("spamd never answered"));
    for _ in 0..120 {
        score = spamd(&addr, gtube).await;
        if score.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let score = score.expect("spamd scan");
    assert!(score >= 100.0, "GTUBE scored {score}");
    let ham = b"From: a@example.net\r\nTo: b@example.com\r\nSubject: lunch\r\n\r\nShall we meet at noon?\r\n";
    let ham_score = spamd(&addr, ham).await.expect("spamd scan");
    assert!(ham_score < 5.0, "a plain message scored {ham_score}");
}

/// SPF, DKIM and DMARC through a real DNS server: unbound (Debian package, installed by
/// tests/run.sh) serving a test zone on a loopback port of its own.
#[tokio::test]
async fn spf_dkim_dmarc_against_unbound() {
    let b64 = base64::engine::general_purpose::STANDARD;
    let der = Ed25519Key::generate_pkcs8().expect("key");
    let public = b64.encode(Ed25519Key::from_pkcs8_der(&der).expect("key").public_key());
    let pem = format!("-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n", b64.encode(&der));
    let ub = Unbound::start(
        &["test."],
        &[
            "good.test. TXT \"v=spf1 ip4:127.0.0.1 -all\"",
            "bad.test. TXT \"v=spf1 ip4:192.0.2.1 -all\"",
            &format!("sel._domainkey.good.test. TXT \"v=DKIM1; k=ed25519; p={public}\""),
            "_dmarc.good.test. TXT \"v=DMARC1; p=reject\"",
            "_dmarc.bad.test. TXT \"v=DMARC1; p=quarantine\"",
        ],
        &[],
    );
    let port = ub.port;
    let policy = format!(
        "require [\"spf\", \"dkim\", \"dmarc\"];\nsecret dkim = file \"key.pem\";\n\
         server {{ hostname \"mx.test\"; dns_server \"127.0.0.1:{port}\"; dkim_key dkim; dkim_selector \"sel\"; dkim_domain \"good.test\"; }}\n\
         on data {{ if spf :is \"fail\" or dkim :is \"fail\" or dmarc :is \"fail\" {{ reject; }} }}\n"
    );
    let c = mailpolicy_lang::compile("p.mailpolicy", &mailpolicy_lang::MemLoader::single("p.mailpolicy", &policy));
    let prog = c.program.expect("policy compiles");
    let signer = mailpolicy_daemon::auth::Signer::from_program(&prog, &|_: &str| Some(pem.clone()))
        .expect("key loads")
        .expect("signing configured");
    let auth = mailpolicy_daemon::auth::SenderAuth::new(
        &prog,
        "mx.test",
        mailpolicy_daemon::transport::mx::policy_resolver(&prog).expect("resolver"),
    );
    let ip: IpAddr = "127.0.0.1".parse().unwrap();

    // unbound may need a moment to start answering
    let mut spf = "temperror";
    for _ in 0..50 {
        let mut st = AuthState::default();
        spf = auth.spf(&mut st, ip, "client.good.test", "alice@good.test").await;
        if spf != "temperror" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(spf, "pass");
    assert_eq!(auth.spf(&mut AuthState::default(), ip, "client.bad.test", "eve@bad.test").await, "fail");
    assert_eq!(auth.spf(&mut AuthState::default(), ip, "client.none.test", "x@none.test").await, "none");

    // Signed by us, From good.test: DKIM and DMARC pass, the domain's policy is reject.
    let body = b"From: Alice <alice@good.test>\r\nTo: bob@example.com\r\nSubject: hi\r\nDate: Sun, 22 Nov 2026 10:00:00 +0000\r\nMessage-ID: <1@good.test>\r\n\r\nHello.\r\n";
    assert!(signer.covers("alice@good.test") && signer.covers("x@sub.good.test") && !signer.covers("x@bad.test"));
    let mut signed = signer.sign(body, "good.test").expect("sign").into_bytes();
    signed.extend_from_slice(body);
    let mut st = AuthState::default();
    let c = auth.content(&mut st, ip, "client.good.test", "alice@good.test", &signed).await;
    assert_eq!((c.dkim_word().as_str(), c.dmarc.result.as_str(), c.dmarc_policy.as_str()), ("pass", "pass", "reject"));
    // What the engine's Authentication-Results field reports with them.
    let props =
        |m: &mailpolicy_engine::conn::MethodReport| m.props.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>();
    assert!(props(&c.dkim[0]).contains(&"header.d=good.test".to_string()), "{c:?}");
    assert!(props(&c.dkim[0]).iter().any(|p| p.starts_with("header.s=")), "{c:?}");
    assert_eq!(props(&c.dmarc), ["header.from=good.test"], "{c:?}");

    // A tampered body breaks the signature.
    let tampered: Vec<u8> = String::from_utf8_lossy(&signed).replace("Hello.", "Hello!").into_bytes();
    let dkim =
        auth.content(&mut AuthState::default(), ip, "client.good.test", "alice@good.test", &tampered).await.dkim_word();
    // mail-auth reports a body-hash mismatch as neutral (RFC 8601 allows either).
    assert!(dkim == "fail" || dkim == "neutral", "a tampered body must not pass: {dkim}");

    // Unsigned, From bad.test, SPF fail: DMARC fails with the domain's quarantine policy.
    let forged = b"From: eve@bad.test\r\nTo: bob@example.com\r\nSubject: x\r\n\r\nx\r\n";
    let c = auth.content(&mut AuthState::default(), ip, "client.bad.test", "eve@bad.test", forged).await;
    assert_eq!(
        (c.dkim_word().as_str(), c.dmarc.result.as_str(), c.dmarc_policy.as_str()),
        ("none", "fail", "quarantine")
    );
}

/// Issue 20.6: an SPF record too large for a UDP answer (unbound cut to 512 bytes says
/// TC) is fetched again over TCP, and SPF passes.
#[tokio::test]
async fn truncated_udp_answers_are_asked_again_over_tcp() {
    // 60 mechanisms: about 1,100 bytes of TXT, twice what a 512-byte UDP answer holds.
    let mut mechs: Vec<String> = (1..=59).map(|i| format!("ip4:192.0.2.{i}")).collect();
    mechs.push("ip4:127.0.0.1".into());
    let record = format!("v=spf1 {} -all", mechs.join(" "));
    let strings: Vec<String> =
        record.as_bytes().chunks(200).map(|c| format!("\"{}\"", String::from_utf8_lossy(c))).collect();
    let ub = Unbound::start(
        &["test."],
        &[&format!("big.test. TXT {}", strings.join(" "))],
        &["do-tcp: yes", "max-udp-size: 512"],
    );
    let port = ub.port;
    let policy = format!("require \"spf\";\nserver {{ dns_server \"127.0.0.1:{port}\"; dns_timeout 2s; }}\non mail {{ if spf :is \"fail\" {{ reject; }} }}\n");
    let c = mailpolicy_lang::compile("p.mailpolicy", &mailpolicy_lang::MemLoader::single("p.mailpolicy", &policy));
    let prog = c.program.expect("policy compiles");
    let auth = mailpolicy_daemon::auth::SenderAuth::new(
        &prog,
        "mx.test",
        mailpolicy_daemon::transport::mx::policy_resolver(&prog).expect("resolver"),
    );
    let ip: IpAddr = "127.0.0.1".parse().unwrap();
    let mut spf = "temperror";
    for _ in 0..50 {
        spf = auth.spf(&mut AuthState::default(), ip, "client.big.test", "alice@big.test").await;
        if spf != "temperror" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(spf, "pass", "the {}-byte record is read over TCP", record.len());
}

// ------------------------------------------------- issue 17: R33 next hops

/// A server that answers every connection with `421 4.3.2` and hangs up; counts them.
fn refusing_greeter(addr: &str) -> (std::sync::Arc<std::sync::atomic::AtomicUsize>, u16) {
    use std::io::Write;
    let l = std::net::TcpListener::bind(addr).expect("bind the 421 server");
    let port = l.local_addr().unwrap().port();
    let n = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = n.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let _ = s.write_all(b"421 4.3.2 Service shutting down, try another host\r\n");
        }
    });
    (n, port)
}

/// MX hosts of equal preference are tried in random order: over 40 deliveries to two
/// smtp-sinks of preference 10 (127.0.0.1 and 127.0.0.2, the same port) both are used
/// (each at least 5 times: failing by chance has odds below 1 in 10^6); the
/// preference-20 host (nothing listens there) is never needed.
#[test]
fn equal_preference_mx_hosts_share_the_mail() {
    let rt = rt();
    let port = free_port();
    let _a = smtp_sink(&[], &format!("127.0.0.1:{port}"));
    let _b = smtp_sink(&[], &format!("127.0.0.2:{port}"));
    let mut r = StaticResolver::new();
    r.add_mx("dst.test", 10, "mx-a.dst.test")
        .add_mx("dst.test", 10, "mx-b.dst.test")
        .add_mx("dst.test", 20, "backup.dst.test")
        .add_ip("mx-a.dst.test", ip("127.0.0.1"))
        .add_ip("mx-b.dst.test", ip("127.0.0.2"))
        .add_ip("backup.dst.test", ip("127.0.0.3"));
    let o = opts(r);
    let target = Target::Smtp(Destination::parse(&format!("dst.test:{port}")).unwrap());
    let mut used: HashMap<String, usize> = HashMap::new();
    for i in 0..40 {
        let rep = rt.block_on(deliver(
            &target,
            &env("a@s.test", &["b@dst.test"]),
            format!("Subject: {i}\n\nx\n").as_bytes(),
            &o,
        ));
        assert!(matches!(&rep.recipients[0], DeliveryOutcome::Delivered(_)), "message {i}: {rep:?}");
        *used.entry(rep.remote_host.clone().unwrap_or_default()).or_default() += 1;
    }
    assert_eq!(used.len(), 2, "{used:?}");
    assert!(used.get("mx-a.dst.test").is_some_and(|n| *n >= 5), "{used:?}");
    assert!(used.get("mx-b.dst.test").is_some_and(|n| *n >= 5), "{used:?}");
}

/// A host that answers 421 at the greeting is skipped for the next MX host; when it is the
/// only one the recipients are deferred with its reply (never bounced).
#[test]
fn a_421_greeting_moves_on_to_the_next_mx_or_defers() {
    let rt = rt();
    let port = free_port();
    let (refused, p421) = refusing_greeter(&format!("127.0.0.2:{port}"));
    assert_eq!(p421, port);
    let _sink = smtp_sink(&[], &format!("127.0.0.1:{port}"));
    let mut r = StaticResolver::new();
    r.add_mx("dst.test", 10, "busy.dst.test")
        .add_mx("dst.test", 20, "ok.dst.test")
        .add_mx("only.test", 10, "busy.dst.test")
        .add_ip("busy.dst.test", ip("127.0.0.2"))
        .add_ip("ok.dst.test", ip("127.0.0.1"));
    let o = opts(r);
    let target = Target::Smtp(Destination::parse(&format!("dst.test:{port}")).unwrap());
    let rep = rt.block_on(deliver(&target, &env("a@s.test", &["b@dst.test"]), b"Subject: x\n\nx\n", &o));
    assert!(matches!(&rep.recipients[0], DeliveryOutcome::Delivered(_)), "{rep:?}");
    assert_eq!(rep.remote_host.as_deref(), Some("ok.dst.test"));
    assert_eq!(refused.load(std::sync::atomic::Ordering::SeqCst), 1, "the better MX was tried first");
    let target = Target::Smtp(Destination::parse(&format!("only.test:{port}")).unwrap());
    let rep = rt.block_on(deliver(&target, &env("a@s.test", &["b@only.test"]), b"Subject: x\n\nx\n", &o));
    match &rep.recipients[0] {
        DeliveryOutcome::Deferred(r) => assert_eq!((r.code, r.enhanced), (421, Some((4, 3, 2))), "{r:?}"),
        other => panic!("deferred expected: {other:?}"),
    }
    assert_eq!(refused.load(std::sync::atomic::Ordering::SeqCst), 2);
}

/// The fallback relay (R33): used when every MX host fails temporarily (a 421 greeting,
/// a refused connection) or the MX lookup fails temporarily; never for a domain that does
/// not exist or has a null MX.
#[test]
fn fallback_relay_after_every_mx_host_failed() {
    let rt = rt();
    let port = free_port();
    let (_refused, _) = refusing_greeter(&format!("127.0.0.2:{port}"));
    let fb_port = free_port();
    let _sink = smtp_sink(&[], &format!("127.0.0.1:{fb_port}"));
    let mut r = StaticResolver::new();
    r.add_mx("dst.test", 10, "busy.dst.test")
        .add_mx("dst.test", 20, "down.dst.test")
        .add_ip("busy.dst.test", ip("127.0.0.2"))
        .add_ip("down.dst.test", ip("127.0.0.3"))
        .fail_mx("tempfail.test", DnsError::Temporary("SERVFAIL".into()))
        .add_mx("null.test", 0, ".");
    let mut o = opts(r);
    let e = |d: &str| env("a@s.test", &[&format!("b@{d}")]);
    let target = |d: &str| Target::Smtp(Destination::parse(&format!("{d}:{port}")).unwrap());
    // without a fallback: deferred
    let rep = rt.block_on(deliver(&target("dst.test"), &e("dst.test"), b"x\n", &o));
    assert!(matches!(&rep.recipients[0], DeliveryOutcome::Deferred(_)), "{rep:?}");
    o.fallback = Destination::parse(&format!("[127.0.0.1]:{fb_port}"));
    for d in ["dst.test", "tempfail.test"] {
        let rep = rt.block_on(deliver(&target(d), &e(d), b"x\n", &o));
        assert!(matches!(&rep.recipients[0], DeliveryOutcome::Delivered(_)), "{d}: {rep:?}");
        assert_eq!(rep.remote_mta, Some(format!("127.0.0.1[127.0.0.1]:{fb_port}")), "{d}");
    }
    for (d, status) in [("nxdomain.test", (5, 4, 4)), ("null.test", (5, 1, 10))] {
        let rep = rt.block_on(deliver(&target(d), &e(d), b"x\n", &o));
        match &rep.recipients[0] {
            DeliveryOutcome::Failed(r) => assert_eq!(r.enhanced, Some(status), "{d}: {r:?}"),
            other => panic!("{d}: a bounce expected, not {other:?}"),
        }
    }
    // a fixed host ([host], not MX delivery) never falls back
    let fixed = Target::Smtp(Destination::parse(&format!("[127.0.0.3]:{port}")).unwrap());
    let rep = rt.block_on(deliver(&fixed, &e("dst.test"), b"x\n", &o));
    assert!(matches!(&rep.recipients[0], DeliveryOutcome::Deferred(_)), "{rep:?}");
}
