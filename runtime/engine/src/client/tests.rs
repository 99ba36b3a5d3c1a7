//! The client engine against scripted byte streams: pipelining, DSN parameters, EHLO
//! fallbacks, per-recipient and DATA failures, 421, multi-line replies, garbage, LMTP,
//! call-ahead, STARTTLS, AUTH, local refusals, DATA encoding.

use super::*;
use crate::smtp::{
    parse_forward_path, parse_reverse_path, BodyType, Envelope, MailParams, Notify, Orcpt, RcptParams, Recipient, Ret,
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

/// DATA even when CHUNKING is offered (most tests are about DATA); the BDAT tests turn it on.
fn cfg() -> ClientConfig {
    ClientConfig { helo_name: "client.test".into(), tls: TlsPolicy::None, chunking: false, ..Default::default() }
}

fn cfg_bdat() -> ClientConfig {
    ClientConfig { chunking: true, ..cfg() }
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

/// Issue 10.5: a line longer than 998 octets goes out over DATA broken by CRLF SPACE (as
/// Postfix's smtp_line_length_limit does); shorter lines are untouched.
#[test]
fn long_lines_are_folded_on_the_way_out() {
    let mut msg = b"Subject: x\r\n\r\n".to_vec();
    msg.extend_from_slice(&[b'a'; 2500]);
    msg.extend_from_slice(b"\r\nshort\r\n");
    let out = encode_data(&msg);
    let text = String::from_utf8(out).unwrap();
    let lines: Vec<&str> = text.split("\r\n").collect();
    assert!(lines.iter().all(|l| l.len() <= 998), "every line within 998 octets");
    assert_eq!(lines[2].len(), 998);
    assert_eq!(lines[3].len(), 998);
    assert!(lines[3].starts_with(' ') && lines[4].starts_with(' '));
    assert_eq!(lines.iter().map(|l| l.trim_start_matches(' ').matches('a').count()).sum::<usize>(), 2500);
    assert!(text.contains("\r\nshort\r\n.\r\n"));
}

// ---------------------------------------------------- CHUNKING, BINARYMIME, SMTPUTF8

const EHLO_BINARY: &str =
    "250-mx.test hello\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250-CHUNKING\r\n250 BINARYMIME\r\n";

#[test]
fn chunking_sends_one_bdat_last_chunk_without_dot_stuffing() {
    let mut c = ready(cfg_bdat(), EHLO_FULL);
    let mut e = env("a@src.test", &["b@dst.test", "c@dst.test"]);
    e.params.body = BodyType::EightBitMime;
    c.send_message(&e, b"Subject: x\n\n.dot\nline").unwrap();
    let content = "Subject: x\r\n\r\n.dot\r\nline\r\n";
    assert_eq!(
        tx(&mut c),
        format!(
            "MAIL FROM:<a@src.test> SIZE={} BODY=8BITMIME\r\nRCPT TO:<b@dst.test>\r\nRCPT TO:<c@dst.test>\r\nBDAT {} LAST\r\n{content}",
            content.len(),
            content.len()
        )
    );
    c.handle_input(b"250 ok\r\n250 ok\r\n550 5.1.1 no\r\n");
    assert_eq!(c.waiting_for(), Some(Phase::DataEnd));
    c.handle_input(b"250 2.0.0 queued\r\n");
    let evs = events(&mut c);
    assert_eq!(codes(&txn_result(&evs)), vec![250, 550]);
    assert_eq!(evs.last(), Some(&ClientEvent::Ready));
    assert_eq!(tx(&mut c), "");
}

#[test]
fn binarymime_goes_byte_for_byte_and_only_where_offered() {
    let body: &[u8] = b"Content-Type: application/octet-stream\r\n\r\n\x00\r\x80\n.\r\n";
    let mut e = env("a@src.test", &["b@dst.test"]);
    e.params.body = BodyType::BinaryMime;
    // offered: BODY=BINARYMIME and the bytes as they are
    let mut c = ready(ClientConfig { pipelining: false, ..cfg_bdat() }, EHLO_BINARY);
    c.send_message(&e, body).unwrap();
    assert_eq!(tx(&mut c), "MAIL FROM:<a@src.test> BODY=BINARYMIME\r\n");
    c.handle_input(b"250 ok\r\n");
    assert_eq!(tx(&mut c), "RCPT TO:<b@dst.test>\r\n");
    c.handle_input(b"250 ok\r\n");
    let mut want = format!("BDAT {} LAST\r\n", body.len()).into_bytes();
    want.extend_from_slice(body);
    assert_eq!(c.poll_transmit().unwrap(), want);
    c.handle_input(b"250 ok\r\n");
    assert_eq!(codes(&txn_result(&events(&mut c))), vec![250]);
    // CHUNKING without BINARYMIME, or no CHUNKING: refused without a word sent (5.6.3)
    for ehlo in [EHLO_FULL, "250-mx.test\r\n250 8BITMIME\r\n"] {
        let mut c = ready(cfg_bdat(), ehlo);
        c.send_message(&e, body).unwrap();
        assert_eq!(tx(&mut c), "");
        let t = txn_result(&events(&mut c));
        assert_eq!(t.recipients[0].code, 554);
        assert_eq!(t.recipients[0].enhanced, Some((5, 6, 3)));
    }
    // and with chunking turned off in the configuration
    let mut c = ready(cfg(), EHLO_BINARY);
    c.send_message(&e, body).unwrap();
    assert_eq!(tx(&mut c), "");
    assert_eq!(txn_result(&events(&mut c)).recipients[0].enhanced, Some((5, 6, 3)));
}

#[test]
fn bdat_refused_and_every_recipient_refused() {
    // pipelined, every RCPT refused: the chunk was sent, its reply ends the transaction
    let mut c = ready(cfg_bdat(), EHLO_BINARY);
    c.send_message(&env("a@src.test", &["b@dst.test"]), b"x\n").unwrap();
    assert!(tx(&mut c).ends_with("BDAT 3 LAST\r\nx\r\n"));
    c.handle_input(b"250 ok\r\n550 5.1.1 no such user\r\n554 5.5.1 no valid recipients\r\n");
    let t = txn_result(&events(&mut c));
    assert_eq!(t.recipients[0].code, 550);
    assert_eq!(tx(&mut c), "RSET\r\n");
    c.handle_input(b"250 ok\r\n");
    assert_eq!(events(&mut c), vec![ClientEvent::Ready]);
    // the chunk refused: every accepted recipient gets that reply, then RSET
    c.send_message(&env("a@src.test", &["b@dst.test"]), b"x\n").unwrap();
    tx(&mut c);
    c.handle_input(b"250 ok\r\n250 ok\r\n452 4.3.1 out of space\r\n");
    let t = txn_result(&events(&mut c));
    assert_eq!(t.recipients[0].code, 452);
    assert_eq!(tx(&mut c), "RSET\r\n");
}

#[test]
fn smtputf8_message_to_a_hop_without_smtputf8() {
    let no_utf8 = "250-mx.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n";
    // an international address: 553 5.6.7
    let mut c = ready(cfg(), no_utf8);
    let mut e = env("a@src.test", &["j\u{f6}rg@dst.test"]);
    e.params.smtputf8 = true;
    c.send_message(&e, b"Subject: x\n\nx\n").unwrap();
    assert_eq!(tx(&mut c), "");
    let t = txn_result(&events(&mut c));
    assert_eq!((t.recipients[0].code, t.recipients[0].enhanced), (553, Some((5, 6, 7))));
    // ASCII addresses but a UTF-8 header: 554 5.6.7, never downgraded
    let mut e = env("a@src.test", &["b@dst.test"]);
    e.params.smtputf8 = true;
    c.send_message(&e, "Subject: gr\u{fc}\u{df}e\n\nx\n".as_bytes()).unwrap();
    assert_eq!(tx(&mut c), "");
    let t = txn_result(&events(&mut c));
    assert_eq!((t.recipients[0].code, t.recipients[0].enhanced), (554, Some((5, 6, 7))));
    // ASCII addresses and headers (UTF-8 only in the 8bit body): sent without SMTPUTF8
    c.send_message(&e, "Subject: x\n\ngr\u{fc}\u{df}e\n".as_bytes()).unwrap();
    assert!(tx(&mut c).starts_with("MAIL FROM:<a@src.test>\r\n"));
    // offered: SMTPUTF8 on MAIL
    let mut c = ready(cfg(), EHLO_FULL);
    c.send_message(&e, "Subject: gr\u{fc}\u{df}e\n\nx\n".as_bytes()).unwrap();
    let sent = tx(&mut c);
    assert!(sent.starts_with("MAIL FROM:<a@src.test> SIZE=23 SMTPUTF8\r\n"), "{sent}");
}
