//! Transport tests: the client engine against scripted byte streams, the
//! driver against Postfix's smtp-sink and scripted TLS servers on loopback,
//! MX selection, Maildir/mbox, DSN structure.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use super::client::*;
use super::driver::*;
use super::dsn::*;
use super::local;
use super::mx::*;
use crate::smtp::{
    parse_forward_path, parse_reverse_path, BodyType, Envelope, MailParams, Notify, Orcpt, RcptParams, Recipient,
    Reply, Ret, ReversePath,
};

// ---------------------------------------------------------------- helpers

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

fn tx(c: &mut Client) -> String {
    let mut s = Vec::new();
    while let Some(b) = c.poll_transmit() {
        s.extend(b);
    }
    String::from_utf8(s).expect("utf8")
}

fn events(c: &mut Client) -> Vec<ClientEvent> {
    std::iter::from_fn(|| c.poll_event()).collect()
}

fn cfg() -> ClientConfig {
    ClientConfig { helo_name: "client.test".into(), tls: TlsPolicy::None, ..Default::default() }
}

const EHLO_FULL: &str = "250-mx.test hello\r\n250-PIPELINING\r\n250-SIZE 10000\r\n250-8BITMIME\r\n250-DSN\r\n250-ENHANCEDSTATUSCODES\r\n250-SMTPUTF8\r\n250 CHUNKING\r\n";

/// A client past EHLO with the given EHLO reply.
fn ready(cfg: ClientConfig, ehlo: &str) -> Client {
    let mut c = Client::new(cfg);
    c.handle_input(b"220 mx.test ESMTP\r\n");
    assert_eq!(tx(&mut c), "EHLO client.test\r\n");
    c.handle_input(ehlo.as_bytes());
    assert_eq!(events(&mut c), vec![ClientEvent::Ready]);
    c
}

fn txn_result(evs: &[ClientEvent]) -> TransactionResult {
    evs.iter()
        .find_map(|e| match e {
            ClientEvent::Transaction(t) => Some(t.clone()),
            _ => None,
        })
        .expect("a transaction result")
}

fn codes(t: &TransactionResult) -> Vec<u16> {
    t.recipients.iter().map(|r| r.code).collect()
}

// ---------------------------------------------------- client engine

#[test]
fn pipelined_transaction_with_dsn_parameters() {
    let mut c = ready(cfg(), EHLO_FULL);
    let ext = c.extensions().clone();
    assert!(ext.pipelining && ext.dsn && ext.eight_bit_mime && ext.chunking);
    assert_eq!(ext.size, Some(10000));
    let mut e = env("a@src.test", &["b@dst.test", "c@dst.test"]);
    e.params.ret = Some(Ret::Hdrs);
    e.params.envid = Some("id 1+x".into());
    e.params.body = BodyType::EightBitMime;
    e.recipients[0].params.notify = Some(Notify { success: true, failure: true, ..Default::default() });
    e.recipients[0].params.orcpt = Some(Orcpt { addr_type: "rfc822".into(), address: "B@dst.test".into() });
    e.recipients[1].params.notify = Some(Notify { never: true, ..Default::default() });
    c.send_message(&e, b"Subject: x\n\n.dot\nline\n").unwrap();
    // one write: MAIL, RCPT, RCPT, DATA
    assert_eq!(
        tx(&mut c),
        "MAIL FROM:<a@src.test> SIZE=27 BODY=8BITMIME RET=HDRS ENVID=id+201+2Bx\r\n\
         RCPT TO:<b@dst.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;B@dst.test\r\n\
         RCPT TO:<c@dst.test> NOTIFY=NEVER\r\n\
         DATA\r\n"
    );
    assert_eq!(c.waiting_for(), Some(Phase::Mail));
    // replies may arrive split anywhere
    for chunk in ["250 2.1.0 ok\r\n250 2.1", ".5 ok\r\n250 2.1.5 ok\r\n3", "54 go ahead\r\n"] {
        c.handle_input(chunk.as_bytes());
    }
    assert_eq!(tx(&mut c), "Subject: x\r\n\r\n..dot\r\nline\r\n.\r\n", "dot-stuffed, CRLF");
    assert_eq!(c.waiting_for(), Some(Phase::DataEnd));
    c.handle_input(b"250 2.0.0 queued as X\r\n");
    let evs = events(&mut c);
    let t = txn_result(&evs);
    assert_eq!(codes(&t), vec![250, 250]);
    assert!(t.next_hop_dsn);
    assert_eq!(t.recipients[0].enhanced, Some((2, 0, 0)));
    assert_eq!(evs.last(), Some(&ClientEvent::Ready));
    assert!(c.is_ready());
    // no RSET after a complete transaction
    assert_eq!(tx(&mut c), "");
}

#[test]
fn ehlo_refused_falls_back_to_helo_without_extensions() {
    let mut c = Client::new(cfg());
    c.handle_input(b"220 old.test\r\n");
    assert_eq!(tx(&mut c), "EHLO client.test\r\n");
    c.handle_input(b"502 5.5.2 what?\r\n");
    assert_eq!(tx(&mut c), "HELO client.test\r\n");
    c.handle_input(b"250 old.test\r\n");
    assert_eq!(events(&mut c), vec![ClientEvent::Ready]);
    assert!(!c.extensions().esmtp);
    let mut e = env("a@src.test", &["b@dst.test", "c@dst.test"]);
    e.params.ret = Some(Ret::Full);
    e.recipients[0].params.notify = Some(Notify { success: true, ..Default::default() });
    c.send_message(&e, b"x").unwrap();
    // no pipelining: one command at a time, no DSN parameters
    assert_eq!(tx(&mut c), "MAIL FROM:<a@src.test>\r\n");
    c.handle_input(b"250 ok\r\n");
    assert_eq!(tx(&mut c), "RCPT TO:<b@dst.test>\r\n");
    c.handle_input(b"250 ok\r\n");
    assert_eq!(tx(&mut c), "RCPT TO:<c@dst.test>\r\n");
    c.handle_input(b"250 ok\r\n");
    assert_eq!(tx(&mut c), "DATA\r\n");
    c.handle_input(b"354 go\r\n");
    assert_eq!(tx(&mut c), "x\r\n.\r\n");
    c.handle_input(b"250 ok\r\n");
    let t = txn_result(&events(&mut c));
    assert_eq!(codes(&t), vec![250, 250]);
    assert!(!t.next_hop_dsn, "the host owes a relayed DSN");
}

#[test]
fn ehlo_4xx_fails_the_session() {
    let mut c = Client::new(cfg());
    c.handle_input(b"220 x\r\n");
    tx(&mut c);
    c.handle_input(b"454 4.3.0 try later\r\n");
    let evs = events(&mut c);
    assert!(matches!(&evs[..], [ClientEvent::Failed(SessionError { phase: Phase::Helo, reply })] if reply.code == 454));
    assert_eq!(tx(&mut c), "QUIT\r\n");
}

#[test]
fn per_recipient_failures_and_rset() {
    let mut c = ready(cfg(), EHLO_FULL);
    let e = env("a@src.test", &["u1@d.test", "u2@d.test", "u3@d.test"]);
    c.send_message(&e, b"hi\r\n").unwrap();
    tx(&mut c);
    c.handle_input(b"250 2.1.0 ok\r\n550 5.1.1 no such user\r\n452 4.2.2 over quota\r\n250 2.1.5 ok\r\n354 go\r\n");
    assert_eq!(tx(&mut c), "hi\r\n.\r\n");
    c.handle_input(b"250 2.0.0 ok\r\n");
    let t = txn_result(&events(&mut c));
    assert_eq!(codes(&t), vec![550, 452, 250]);
    assert_eq!(t.recipients[0].enhanced, Some((5, 1, 1)));
    assert_eq!(t.recipients[0].text, "no such user");

    // every RCPT refused, pipelined: DATA gets 554, then RSET
    let e = env("a@src.test", &["u1@d.test"]);
    c.send_message(&e, b"hi\r\n").unwrap();
    tx(&mut c);
    c.handle_input(b"250 2.1.0 ok\r\n550 5.1.1 no\r\n554 5.5.1 no valid recipients\r\n");
    let evs = events(&mut c);
    assert_eq!(codes(&txn_result(&evs)), vec![550]);
    assert_eq!(tx(&mut c), "RSET\r\n");
    assert!(!c.is_ready());
    c.handle_input(b"250 2.0.0 ok\r\n");
    assert_eq!(events(&mut c), vec![ClientEvent::Ready]);

    // MAIL refused, not pipelined: no RCPT sent at all
    let mut c = ready(cfg(), "250-x\r\n250 DSN\r\n");
    let e = env("a@src.test", &["u1@d.test", "u2@d.test"]);
    c.send_message(&e, b"hi\r\n").unwrap();
    assert_eq!(tx(&mut c), "MAIL FROM:<a@src.test>\r\n");
    c.handle_input(b"553 5.7.1 sender rejected\r\n");
    let t = txn_result(&events(&mut c));
    assert_eq!(codes(&t), vec![553, 553]);
    assert_eq!(tx(&mut c), "RSET\r\n");
}

#[test]
fn data_rejections() {
    let mut c = ready(cfg(), EHLO_FULL);
    let e = env("a@src.test", &["u1@d.test", "u2@d.test"]);
    c.send_message(&e, b"hi\r\n").unwrap();
    tx(&mut c);
    c.handle_input(b"250 ok\r\n250 ok\r\n550 5.1.1 no\r\n451 4.3.0 DATA not now\r\n");
    let t = txn_result(&events(&mut c));
    assert_eq!(codes(&t), vec![451, 550]);
    assert_eq!(tx(&mut c), "RSET\r\n");
    c.handle_input(b"250 ok\r\n");
    events(&mut c);
    // content refused after the dot
    c.send_message(&e, b"virus\r\n").unwrap();
    tx(&mut c);
    c.handle_input(b"250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n");
    tx(&mut c);
    c.handle_input(b"554-5.7.1 message refused\r\n554 5.7.1 it contains a virus\r\n");
    let t = txn_result(&events(&mut c));
    assert_eq!(codes(&t), vec![554, 554]);
    assert_eq!(t.recipients[0].text, "message refused\nit contains a virus");
    // a 354 although nothing was accepted (RFC 2920): send an empty message
    c.send_message(&env("a@s.test", &["x@d.test"]), b"m").unwrap();
    tx(&mut c);
    c.handle_input(b"250 ok\r\n550 no\r\n354 go\r\n");
    assert_eq!(tx(&mut c), ".\r\n");
    c.handle_input(b"554 no valid recipients\r\n");
    assert_eq!(codes(&txn_result(&events(&mut c))), vec![550]);
    assert_eq!(tx(&mut c), "RSET\r\n");
}

#[test]
fn code_421_mid_session_defers_the_rest() {
    let mut c = ready(cfg(), EHLO_FULL);
    let e = env("a@src.test", &["u1@d.test", "u2@d.test", "u3@d.test"]);
    c.send_message(&e, b"hi\r\n").unwrap();
    tx(&mut c);
    c.handle_input(b"250 ok\r\n550 5.1.1 no\r\n421 4.3.2 shutting down\r\n");
    let evs = events(&mut c);
    let t = txn_result(&evs);
    assert_eq!(codes(&t), vec![550, 421, 421]);
    assert!(matches!(evs.last(), Some(ClientEvent::Failed(SessionError { phase: Phase::Rcpt, .. }))));
    assert!(c.is_closed());
    // late input is ignored
    c.handle_input(b"250 ok\r\n");
    assert!(events(&mut c).is_empty());

    // EOF after the dot: deferred (the message may or may not be delivered)
    let mut c = ready(cfg(), EHLO_FULL);
    c.send_message(&env("a@s.test", &["x@d.test"]), b"m").unwrap();
    tx(&mut c);
    c.handle_input(b"250 ok\r\n250 ok\r\n354 go\r\n");
    tx(&mut c);
    c.handle_eof();
    let evs = events(&mut c);
    assert_eq!(txn_result(&evs).recipients[0].code, 421);
    assert_eq!(txn_result(&evs).recipients[0].enhanced, Some((4, 4, 2)));
    // timeout while waiting
    let mut c = ready(cfg(), EHLO_FULL);
    c.send_message(&env("a@s.test", &["x@d.test"]), b"m").unwrap();
    c.handle_timeout();
    let evs = events(&mut c);
    assert_eq!(codes(&txn_result(&evs)), vec![421]);
}

#[test]
fn multi_line_replies_and_enhanced_codes() {
    let mut c = Client::new(cfg());
    c.handle_input(b"220-mx.test ESMTP\r\n220-second line\r\n220 third\r\n");
    assert_eq!(c.greeting().map(|g| g.text.as_str()), Some("mx.test ESMTP\nsecond line\nthird"));
    tx(&mut c);
    c.handle_input(b"250-mx.test\n250-AUTH=LOGIN\r\n250-AUTH PLAIN LOGIN CRAM-MD5\r\n250-size\r\n250 STARTTLS\r\n");
    let ext = c.extensions();
    assert_eq!(ext.auth, vec!["LOGIN", "PLAIN", "CRAM-MD5"]);
    assert_eq!(ext.size, Some(0));
    assert!(ext.starttls && !ext.pipelining);
    // mixed codes in one reply: protocol error
    let mut c = ready(cfg(), EHLO_FULL);
    c.send_message(&env("a@s.test", &["x@d.test"]), b"m").unwrap();
    c.handle_input(b"250-ok\r\n251 ok\r\n");
    let evs = events(&mut c);
    assert!(matches!(evs.last(), Some(ClientEvent::Failed(e)) if e.reply.enhanced == Some((4, 5, 0))));
    assert_eq!(codes(&txn_result(&evs)), vec![421]);
}

#[test]
fn garbage_never_panics() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let pieces: [&[u8]; 12] = [
        b"220 ok\r\n",
        b"250-",
        b"250 ",
        b"354 go\r\n",
        b"421 bye\r\n",
        b"\r\n",
        b"\n",
        b"5",
        b"999 x\r\n",
        b"250 2.1.5 x\r\n",
        b"\xff\xfe",
        b"334 \r\n",
    ];
    for _ in 0..3000 {
        let mut c = Client::new(ClientConfig { auth: Credentials::parse("u:p"), tls: TlsPolicy::May, ..cfg() });
        for _ in 0..rng.gen_range(1..40) {
            let mut buf = Vec::new();
            for _ in 0..rng.gen_range(1..6) {
                if rng.gen_bool(0.2) {
                    buf.extend((0..rng.gen_range(0..20)).map(|_| rng.gen::<u8>()));
                } else {
                    buf.extend_from_slice(pieces[rng.gen_range(0..pieces.len())]);
                }
            }
            c.handle_input(&buf);
            while let Some(ev) = c.poll_event() {
                if ev == ClientEvent::StartTls {
                    let _ = c.tls_established();
                }
            }
            let _ = c.poll_transmit();
            if c.is_ready() {
                let _ = c.send_message(&env("a@s.test", &["x@d.test", "y@d.test"]), b"m");
            }
        }
        c.handle_eof();
    }
}

#[test]
fn lmtp_one_reply_per_recipient() {
    let mut c = Client::new(ClientConfig { protocol: Protocol::Lmtp, ..cfg() });
    c.handle_input(b"220 dovecot LMTP\r\n");
    assert_eq!(tx(&mut c), "LHLO client.test\r\n");
    c.handle_input(b"250-dovecot\r\n250-PIPELINING\r\n250-ENHANCEDSTATUSCODES\r\n250 8BITMIME\r\n");
    events(&mut c);
    let e = env("a@s.test", &["u1@d.test", "u2@d.test", "u3@d.test"]);
    c.send_message(&e, b"m\n").unwrap();
    tx(&mut c);
    c.handle_input(b"250 ok\r\n250 ok\r\n550 5.1.1 unknown\r\n250 ok\r\n354 go\r\n");
    assert_eq!(tx(&mut c), "m\r\n.\r\n");
    c.handle_input(b"250 2.0.0 <u1@d.test> saved\r\n");
    assert!(events(&mut c).is_empty(), "waits for every accepted recipient");
    c.handle_input(b"452 4.2.2 <u3@d.test> quota exceeded\r\n");
    let evs = events(&mut c);
    let t = txn_result(&evs);
    assert_eq!(codes(&t), vec![250, 550, 452]);
    assert_eq!(evs.last(), Some(&ClientEvent::Ready));
    // LMTP never falls back to HELO
    let mut c = Client::new(ClientConfig { protocol: Protocol::Lmtp, ..cfg() });
    c.handle_input(b"220 x\r\n500 no\r\n");
    assert!(matches!(events(&mut c)[..], [ClientEvent::Failed(_)]));
}

#[test]
fn call_ahead_reuses_the_session() {
    let mut c = ready(cfg(), EHLO_FULL);
    let from = parse_reverse_path("<>", false).unwrap();
    let to = parse_forward_path("<nobody@d.test>", false).unwrap();
    c.call_ahead(&from, &to).unwrap();
    assert_eq!(tx(&mut c), "MAIL FROM:<>\r\nRCPT TO:<nobody@d.test>\r\nRSET\r\n");
    c.handle_input(b"250 ok\r\n550 5.1.1 user unknown\r\n250 ok\r\n");
    let evs = events(&mut c);
    match &evs[..] {
        [ClientEvent::CallAhead(r), ClientEvent::Ready] => {
            assert_eq!(r.answer().code, 550);
            assert_eq!(r.answer().enhanced, Some((5, 1, 1)));
        }
        other => panic!("{other:?}"),
    }
    // not pipelined, MAIL refused
    let mut c = ready(cfg(), "250 x\r\n");
    c.call_ahead(&from, &to).unwrap();
    assert_eq!(tx(&mut c), "MAIL FROM:<>\r\n");
    c.handle_input(b"451 4.3.0 later\r\n");
    let evs = events(&mut c);
    assert!(matches!(&evs[..], [ClientEvent::CallAhead(r)] if r.answer().code == 451 && r.rcpt.is_none()));
    assert_eq!(tx(&mut c), "RSET\r\n");
    c.handle_input(b"250 ok\r\n");
    assert_eq!(events(&mut c), vec![ClientEvent::Ready]);
    c.call_ahead(&from, &to).unwrap();
    tx(&mut c);
    c.handle_input(b"250 ok\r\n");
    assert_eq!(tx(&mut c), "RCPT TO:<nobody@d.test>\r\n");
    c.handle_input(b"250 ok\r\n");
    assert_eq!(tx(&mut c), "RSET\r\n");
    c.handle_input(b"250 ok\r\n");
    assert!(matches!(&events(&mut c)[..], [ClientEvent::CallAhead(r), ClientEvent::Ready] if r.answer().code == 250));
}

#[test]
fn starttls_discards_injected_bytes_and_says_ehlo_again() {
    let mut c = Client::new(ClientConfig { tls: TlsPolicy::May, ..cfg() });
    c.handle_input(b"220 x\r\n");
    tx(&mut c);
    c.handle_input(b"250-x\r\n250 STARTTLS\r\n");
    assert_eq!(tx(&mut c), "STARTTLS\r\n");
    c.handle_input(b"220 go ahead\r\n250 injected\r\n");
    assert_eq!(events(&mut c), vec![ClientEvent::StartTls]);
    assert_eq!(c.waiting_for(), Some(Phase::StartTls));
    c.tls_established().unwrap();
    assert!(c.tls_active());
    assert_eq!(tx(&mut c), "EHLO client.test\r\n");
    c.handle_input(b"250-x\r\n250 STARTTLS\r\n");
    assert_eq!(events(&mut c), vec![ClientEvent::Ready], "no second STARTTLS");
    // may: STARTTLS refused, go on in clear
    let mut c = Client::new(ClientConfig { tls: TlsPolicy::May, ..cfg() });
    c.handle_input(b"220 x\r\n250-x\r\n250 STARTTLS\r\n454 4.7.0 no TLS now\r\n");
    assert!(events(&mut c).contains(&ClientEvent::Ready));
    // required: not offered / refused
    for input in [&b"220 x\r\n250 x\r\n"[..], b"220 x\r\n250-x\r\n250 STARTTLS\r\n454 no\r\n"] {
        let mut c = Client::new(ClientConfig { tls: TlsPolicy::Required, ..cfg() });
        c.handle_input(input);
        let evs = events(&mut c);
        match &evs[..] {
            [ClientEvent::Failed(e)] => {
                assert_eq!(e.phase, Phase::StartTls);
                assert_eq!(e.reply.code, 451);
                assert_eq!(e.reply.enhanced.map(|x| x.1), Some(7));
            }
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn auth_plain_and_login() {
    let creds = Credentials::parse("user@x:pa:ss").unwrap();
    assert_eq!(creds.password, "pa:ss");
    let mut c = Client::new(ClientConfig { auth: Some(creds.clone()), ..cfg() });
    c.handle_input(b"220 x\r\n250-x\r\n250 AUTH LOGIN PLAIN\r\n");
    // base64("\0user@x\0pa:ss")
    assert_eq!(tx(&mut c), "EHLO client.test\r\nAUTH PLAIN AHVzZXJAeABwYTpzcw==\r\n");
    c.handle_input(b"235 2.7.0 ok\r\n");
    assert_eq!(events(&mut c), vec![ClientEvent::Ready]);
    assert!(c.authenticated());

    let mut c = Client::new(ClientConfig { auth: Some(creds.clone()), ..cfg() });
    c.handle_input(b"220 x\r\n250-x\r\n250 AUTH LOGIN\r\n");
    assert_eq!(tx(&mut c), "EHLO client.test\r\nAUTH LOGIN\r\n");
    c.handle_input(b"334 VXNlcm5hbWU6\r\n");
    assert_eq!(tx(&mut c), "dXNlckB4\r\n");
    c.handle_input(b"334 UGFzc3dvcmQ6\r\n");
    assert_eq!(tx(&mut c), "cGE6c3M=\r\n");
    c.handle_input(b"535 5.7.8 bad credentials\r\n");
    match &events(&mut c)[..] {
        [ClientEvent::Failed(e)] => {
            assert_eq!(e.phase, Phase::Auth);
            assert_eq!(e.reply.code, 454, "auth failure defers, like Postfix");
            assert!(e.reply.text.contains("bad credentials"));
        }
        other => panic!("{other:?}"),
    }
    // no mechanism in common
    let mut c = Client::new(ClientConfig { auth: Some(creds), ..cfg() });
    c.handle_input(b"220 x\r\n250-x\r\n250 AUTH CRAM-MD5\r\n");
    assert!(matches!(&events(&mut c)[..], [ClientEvent::Failed(e)] if e.reply.code == 454));
}

#[test]
fn local_refusals_need_no_round_trip() {
    let mut c = ready(cfg(), "250-x\r\n250 SIZE 10\r\n");
    c.send_message(&env("a@s.test", &["x@d.test"]), &[b'a'; 11]).unwrap();
    assert_eq!(tx(&mut c), "");
    let evs = events(&mut c);
    assert_eq!(txn_result(&evs).recipients[0].enhanced, Some((5, 3, 4)));
    assert_eq!(evs.last(), Some(&ClientEvent::Ready));
    c.send_message(&env("a@s.test", &["jörg@d.test"]), b"x").unwrap();
    assert_eq!(tx(&mut c), "");
    assert_eq!(txn_result(&events(&mut c)).recipients[0].enhanced, Some((5, 6, 7)));
    // offered: SMTPUTF8 parameter sent
    let mut c = ready(cfg(), "250-x\r\n250 SMTPUTF8\r\n");
    c.send_message(&env("a@s.test", &["jörg@d.test"]), b"x").unwrap();
    assert_eq!(tx(&mut c), "MAIL FROM:<a@s.test> SMTPUTF8\r\n");
    assert_eq!(c.send_message(&env("a@s.test", &["x@d.test"]), b"x"), Err(UsageError::NotReady));
}

#[test]
fn data_encoding() {
    assert_eq!(encode_data(b""), b".\r\n");
    assert_eq!(encode_data(b".\n..\r\nx.\r"), b"..\r\n...\r\nx.\r\n.\r\n");
    assert_eq!(encode_data(b"a\r\n.\r\nb"), b"a\r\n..\r\nb\r\n.\r\n");
    assert_eq!(encode_xtext("a+b=c d\u{e9}"), "a+2Bb+3Dc+20d+C3+A9");
}

// ---------------------------------------------------------------- MX

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

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

// ---------------------------------------------------------------- real peers

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

struct Peer(Child);

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

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
    assert!(rep.recipients.iter().all(|o| matches!(o, Outcome::Delivered(r) if r.code == 250)), "{rep:?}");
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
                4 => assert!(matches!(oc, Outcome::Deferred(_))),
                _ => assert!(matches!(oc, Outcome::Failed(_))),
            }
        }
    }

    // disconnect without a reply: deferred with a made-up 4.4.2
    let port = free_port();
    let _sink = smtp_sink(&["-q", "rcpt"], &format!("127.0.0.1:{port}"));
    let target = Target::Smtp(Destination::parse(&format!("[127.0.0.1]:{port}")).unwrap());
    let rep = rt.block_on(deliver(&target, &e, msg, &o));
    for oc in &rep.recipients {
        assert!(matches!(oc, Outcome::Deferred(r) if r.enhanced == Some((4, 4, 2))), "{rep:?}");
    }

    // EHLO refused: HELO fallback still delivers; no DSN at the next hop
    let port = free_port();
    let _sink = smtp_sink(&["-f", "ehlo"], &format!("127.0.0.1:{port}"));
    let target = Target::Smtp(Destination::parse(&format!("[127.0.0.1]:{port}")).unwrap());
    let rep = rt.block_on(deliver(&target, &e, msg, &o));
    assert!(rep.recipients.iter().all(|o| matches!(o, Outcome::Delivered(_))), "{rep:?}");
    assert!(!rep.next_hop_dsn);

    // nothing listening: deferred 4.4.1
    let target = Target::Smtp(Destination::parse(&format!("[127.0.0.1]:{}", free_port())).unwrap());
    let rep = rt.block_on(deliver(&target, &e, msg, &o));
    assert!(matches!(&rep.recipients[0], Outcome::Deferred(r) if r.enhanced == Some((4, 4, 1))));
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
    assert!(matches!(&rep.recipients[0], Outcome::Deferred(r) if r.enhanced == Some((4, 7, 4))), "{rep:?}");
    // may: delivered in clear
    o.tls = TlsPolicy::May;
    let rep = rt.block_on(deliver(&target, &env("a@s.test", &["b@d.test"]), b"x\n", &o));
    assert!(matches!(&rep.recipients[0], Outcome::Delivered(_)), "{rep:?}");
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
        assert!(matches!(&rep.recipients[0], Outcome::Delivered(_)), "message {i}: {rep:?}");
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
    assert!(rep.recipients.iter().all(|o| matches!(o, Outcome::Delivered(_))), "{rep:?}");

    let dir = TempDir::new("lmtp");
    let sock = dir.0.join("lmtp.sock");
    let _sink = smtp_sink(&["-L"], &format!("unix:{}", sock.display()));
    let target = Target::Lmtp(LmtpEndpoint::Unix(sock.clone()));
    let rep = rt.block_on(deliver(&target, &e, b"Subject: l\n\nbody\n", &o));
    assert!(rep.recipients.iter().all(|o| matches!(o, Outcome::Delivered(_))), "{rep:?}");

    let port = free_port();
    let _sink = smtp_sink(&["-L", "-r", "."], &format!("127.0.0.1:{port}"));
    let target = Target::parse(&format!("lmtp:[127.0.0.1]:{port}")).unwrap();
    let rep = rt.block_on(deliver(&target, &e, b"x\n", &o));
    assert!(rep.recipients.iter().all(|o| matches!(o, Outcome::Deferred(_))), "{rep:?}");
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
        assert!(matches!(&rep.recipients[0], Outcome::Delivered(_)), "{rep:?}");
        assert!(rep.tls);
        // required with the webpki roots: the self-signed cert fails, deferred 4.7.5
        o.tls = TlsPolicy::Required;
        let rep = deliver(&target, &e, b"x\n", &o).await;
        assert!(matches!(&rep.recipients[0], Outcome::Deferred(r) if r.enhanced == Some((4, 7, 5))), "{rep:?}");
        // required with our root and the right name: delivered
        o.tls_roots = Some(Arc::new(roots));
        let rep = deliver(&target, &e, b"x\n", &o).await;
        assert!(matches!(&rep.recipients[0], Outcome::Delivered(_)), "{rep:?}");
        assert!(rep.tls);
        let got = server.await.unwrap();
        assert_eq!(got[0], (true, b"Subject: tls\r\n\r\nsecret\r\n".to_vec()));
        assert!(!got[1].0, "handshake refused by the client");
        assert!(got[2].0);
    });
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
    assert!(matches!(&rep.recipients[0], Outcome::Delivered(_)));
    // unwritable: deferred
    let rep = rt().block_on(deliver(
        &Target::Maildir(crate::paths::Confined { root: None, path: PathBuf::from("/proc/nonexistent/Maildir") }),
        &e,
        b"x\n",
        &opts(StaticResolver::new()),
    ));
    assert!(matches!(&rep.recipients[0], Outcome::Deferred(_)), "{rep:?}");
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
            DsnKind::Failure,
            "bob@dst.test",
            Some(&Orcpt { addr_type: "rfc822".into(), address: "Bob@dst.test".into() }),
            &Outcome::Failed(Reply::new(550, (5, 1, 1), "<bob@dst.test>: user unknown\r\nInjected: x")),
            Some("mx.dst.test"),
            1_700_000_000_000,
        ),
        DsnRecipient::from_outcome(
            DsnKind::Failure,
            "carol@dst.test",
            None,
            &Outcome::Failed(Reply::plain(552, "quota exceeded")),
            None,
            1_700_000_000_000,
        ),
    ];
    let d = Dsn {
        kind: DsnKind::Failure,
        hostname: "gw.src.test",
        sender: &sender,
        envid: Some("ENV-42"),
        ret: None,
        arrival_date: 1_699_990_000_000,
        now: 1_700_000_000_000,
        recipients: &entries,
        message: original,
        size_limit: 50_000,
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
        DsnKind::Delay,
        "bob@dst.test",
        None,
        &Outcome::Deferred(Reply::new(451, (4, 4, 1), "connection refused")),
        None,
        1_700_000_000_000,
    );
    entry.will_retry_until = Some(1_700_400_000_000);
    let mut d = Dsn {
        kind: DsnKind::Delay,
        hostname: "gw.src.test",
        sender: &sender,
        envid: None,
        ret: None,
        arrival_date: 1_699_990_000_000,
        now: 1_700_000_000_000,
        recipients: std::slice::from_ref(&entry),
        message: &original,
        size_limit: 50_000,
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
    for (kind, action) in [(DsnKind::Success, "delivered"), (DsnKind::Relayed, "relayed")] {
        let e = DsnRecipient::from_outcome(
            kind,
            "bob@dst.test",
            None,
            &Outcome::Delivered(Reply::new(250, (2, 0, 0), "ok")),
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
    use DsnKind::*;
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

// ---------------------------------------------------------------- Dovecot

/// A throwaway Dovecot LMTP server (TCP on loopback and a unix socket)
/// with one known user, `u1@d.test`, whose Maildir is under the temp dir.
struct Dovecot {
    child: Child,
    dir: TempDir,
    port: u16,
}

impl Drop for Dovecot {
    fn drop(&mut self) {
        // SIGTERM lets the master take its children down with it
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        for _ in 0..100 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const DOVECOT: &str = "/usr/sbin/dovecot";

fn dovecot() -> Dovecot {
    assert!(
        std::path::Path::new(DOVECOT).exists() && std::path::Path::new("/usr/lib/dovecot/lmtp").exists(),
        "{DOVECOT} or its lmtp service not found (Debian packages dovecot-core and dovecot-lmtpd); run tests/run.sh, which installs the test peers"
    );
    let dir = TempDir::new("dovecot");
    let d = dir.0.display().to_string();
    // SAFETY: no preconditions.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    // Dovecot refuses to run its internal processes as root
    let (user, uid, gid) = if uid == 0 {
        ("nobody".to_string(), 65534, 65534)
    } else {
        let name = std::env::var("USER").ok().filter(|u| !u.is_empty()).unwrap_or_else(|| {
            String::from_utf8_lossy(&Command::new("id").arg("-un").output().unwrap().stdout).trim().to_string()
        });
        (name, uid, gid)
    };
    for sub in ["run", "state", "mail"] {
        std::fs::create_dir_all(dir.0.join(sub)).unwrap();
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::chown(dir.0.join("mail"), Some(uid), Some(gid)).unwrap();
    std::fs::write(dir.0.join("users"), format!("u1@d.test::{uid}:{gid}::{d}/mail/u1::\n")).unwrap();
    let port = free_port();
    let conf = format!(
        r#"base_dir = {d}/run
state_dir = {d}/state
log_path = {d}/dovecot.log
protocols = lmtp
ssl = no
listen = 127.0.0.1
default_login_user = {user}
default_internal_user = {user}
mail_location = maildir:~/Maildir
passdb {{
  driver = passwd-file
  args = {d}/users
}}
userdb {{
  driver = passwd-file
  args = {d}/users
}}
service lmtp {{
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {port}
  }}
  unix_listener lmtp {{
    mode = 0666
  }}
}}
service anvil {{
  chroot =
}}
service stats {{
  chroot =
}}
"#
    );
    std::fs::write(dir.0.join("dovecot.conf"), conf).unwrap();
    let child = Command::new(DOVECOT)
        .arg("-F")
        .arg("-c")
        .arg(dir.0.join("dovecot.conf"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start dovecot");
    let dv = Dovecot { child, dir, port };
    for _ in 0..250 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() && dv.dir.0.join("run/lmtp").exists() {
            return dv;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = std::fs::read_to_string(dv.dir.0.join("dovecot.log")).unwrap_or_default();
    panic!("dovecot did not come up on 127.0.0.1:{port}: {log}");
}

#[test]
fn dovecot_lmtp_tcp_and_unix_per_recipient() {
    let dv = dovecot();
    let rt = rt();
    let o = opts(StaticResolver::new());
    let e = env("a@s.test", &["u1@d.test", "nosuchuser@d.test"]);
    let targets = [
        Target::parse(&format!("lmtp:[127.0.0.1]:{}", dv.port)).unwrap(),
        Target::Lmtp(LmtpEndpoint::Unix(dv.dir.0.join("run/lmtp"))),
    ];
    for (i, t) in targets.iter().enumerate() {
        let msg = format!("Subject: via {i}\n\n.dot line\nbody\n");
        let rep = rt.block_on(deliver(t, &e, msg.as_bytes(), &o));
        assert!(matches!(&rep.recipients[0], Outcome::Delivered(r) if r.code == 250), "{rep:?}");
        assert!(matches!(&rep.recipients[1], Outcome::Failed(r) if r.enhanced == Some((5, 1, 1))), "{rep:?}");
    }
    let new = dv.dir.0.join("mail/u1/Maildir/new");
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
    const UNBOUND: &str = "/usr/sbin/unbound";
    assert!(
        std::path::Path::new(UNBOUND).exists(),
        "{UNBOUND} not found (Debian package unbound); run tests/run.sh, which installs the test peers"
    );
    let dir = TempDir::new("unbound");
    let port = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let conf = format!(
        r#"server:
  interface: 127.0.0.1@{port}
  port: {port}
  do-daemonize: no
  username: ""
  chroot: ""
  directory: "{d}"
  pidfile: ""
  use-syslog: no
  logfile: ""
  do-ip6: no
  access-control: 127.0.0.0/8 allow
  local-zone: "ub.test." static
  local-data: "ub.test. IN MX 20 mx2.ub.test."
  local-data: "ub.test. IN MX 10 mx1.ub.test."
  local-data: "mx1.ub.test. IN A 127.0.0.1"
  local-data: "mx2.ub.test. IN A 127.0.0.2"
  local-data: "null.ub.test. IN MX 0 ."
  local-data: "amx.ub.test. IN A 127.0.0.3"
remote-control:
  control-enable: no
"#,
        d = dir.0.display()
    );
    std::fs::write(dir.0.join("unbound.conf"), conf).unwrap();
    let _ub = Peer(
        Command::new(UNBOUND)
            .arg("-d")
            .arg("-c")
            .arg(dir.0.join("unbound.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start unbound"),
    );
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

/// Issue 10.5: a line longer than 998 octets goes out over DATA broken by CRLF SPACE (as
/// Postfix's smtp_line_length_limit does); shorter lines are untouched.
#[test]
fn long_lines_are_folded_on_the_way_out() {
    let mut msg = b"Subject: x\r\n\r\n".to_vec();
    msg.extend_from_slice(&[b'a'; 2500]);
    msg.extend_from_slice(b"\r\nshort\r\n");
    let out = super::client::encode_data(&msg);
    let text = String::from_utf8(out).unwrap();
    let lines: Vec<&str> = text.split("\r\n").collect();
    assert!(lines.iter().all(|l| l.len() <= 998), "every line within 998 octets");
    assert_eq!(lines[2].len(), 998);
    assert_eq!(lines[3].len(), 998);
    assert!(lines[3].starts_with(' ') && lines[4].starts_with(' '));
    assert_eq!(lines.iter().map(|l| l.trim_start_matches(' ').matches('a').count()).sum::<usize>(), 2500);
    assert!(text.contains("\r\nshort\r\n.\r\n"));
}
