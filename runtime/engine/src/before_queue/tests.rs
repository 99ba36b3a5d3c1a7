//! The filter session against scripted byte streams.

use super::*;
use crate::record::QueuedRcpt;

fn call(rcpts: &[&str]) -> FilterCall {
    let message = QueuedMessage {
        sender: "alice@client.test".into(),
        recipients: rcpts.iter().map(|a| QueuedRcpt { address: a.to_string(), ..Default::default() }).collect(),
        data: b"Subject: hi\r\n\r\nbody\r\n.starts with a dot\r\n".to_vec(),
        ..Default::default()
    };
    FilterCall {
        address: "127.0.0.1:10025".into(),
        message,
        xforward: vec![("NAME", "mail.client.test".into()), ("ADDR", "192.0.2.7".into()), ("HELO", "a b".into())],
    }
}

/// Feeds `reply`, returns what the session wrote before it.
fn exchange(s: &mut FilterSession, reply: &str) -> String {
    let sent = String::from_utf8(s.poll_transmit().unwrap_or_default()).unwrap_or_default();
    s.handle_input(reply.as_bytes());
    sent
}

fn written(s: &mut FilterSession) -> String {
    String::from_utf8(s.poll_transmit().unwrap_or_default()).unwrap_or_default()
}

#[test]
fn a_message_goes_through_with_xforward_and_the_filters_reply_is_the_clients() {
    let c = call(&["bob@example.com", "carol@example.com"]);
    let mut s = FilterSession::new("mx.test", &c, c.message.data.clone());
    assert_eq!(exchange(&mut s, "220 filter ESMTP\r\n"), "");
    assert_eq!(
        exchange(&mut s, "250-filter\r\n250-PIPELINING\r\n250 XFORWARD NAME ADDR PROTO HELO\r\n"),
        "EHLO mx.test\r\n"
    );
    // Only the attributes the filter names, xtext-encoded.
    assert_eq!(exchange(&mut s, "250 2.0.0 Ok\r\n"), "XFORWARD NAME=mail.client.test ADDR=192.0.2.7 HELO=a+20b\r\n");
    // One command at a time, although the filter offers PIPELINING.
    assert_eq!(exchange(&mut s, "250 2.1.0 Ok\r\n"), "MAIL FROM:<alice@client.test>\r\n");
    assert_eq!(exchange(&mut s, "250 2.1.5 Ok\r\n"), "RCPT TO:<bob@example.com>\r\n");
    assert_eq!(exchange(&mut s, "250 2.1.5 Ok\r\n"), "RCPT TO:<carol@example.com>\r\n");
    assert_eq!(exchange(&mut s, "354 go\r\n"), "DATA\r\n");
    assert!(s.outcome().is_none());
    let content = exchange(&mut s, "250 2.0.0 Ok: queued as 0A1B2C\r\n");
    assert_eq!(content, "Subject: hi\r\n\r\nbody\r\n..starts with a dot\r\n.\r\n");
    assert_eq!(s.outcome(), Some(&FilterOutcome::Replied(Reply::new(250, (2, 0, 0), "Ok: queued as 0A1B2C"))));
    assert_eq!(written(&mut s), "QUIT\r\n");
}

#[test]
fn no_xforward_is_sent_to_a_filter_that_does_not_offer_it() {
    let c = call(&["bob@example.com"]);
    let mut s = FilterSession::new("mx.test", &c, c.message.data.clone());
    exchange(&mut s, "220 filter\r\n");
    assert_eq!(exchange(&mut s, "250 filter\r\n"), "EHLO mx.test\r\n");
    assert_eq!(written(&mut s), "MAIL FROM:<alice@client.test>\r\n");
}

#[test]
fn a_recipient_the_filter_refuses_refuses_the_message_and_no_content_goes() {
    let c = call(&["bob@example.com", "nobody@example.com"]);
    let mut s = FilterSession::new("mx.test", &c, c.message.data.clone());
    exchange(&mut s, "220 filter\r\n");
    exchange(&mut s, "250 filter\r\n");
    exchange(&mut s, "250 2.1.0 Ok\r\n");
    exchange(&mut s, "250 2.1.5 Ok\r\n");
    assert_eq!(exchange(&mut s, "550 5.1.1 No such user\r\n"), "RCPT TO:<nobody@example.com>\r\n");
    assert_eq!(s.outcome(), Some(&FilterOutcome::Replied(Reply::new(550, (5, 1, 1), "No such user"))));
    let rest = written(&mut s);
    assert!(!rest.contains("DATA"), "{rest}");
    assert!(rest.starts_with("RSET\r\n"), "{rest}");
}

#[test]
fn the_filters_refusal_of_the_content_is_the_clients() {
    let c = call(&["bob@example.com"]);
    let mut s = FilterSession::new("mx.test", &c, c.message.data.clone());
    for r in ["220 f\r\n", "250 f\r\n", "250 ok\r\n", "250 ok\r\n", "354 go\r\n"] {
        exchange(&mut s, r);
    }
    exchange(&mut s, "554 5.7.1 Spam message rejected\r\n");
    assert_eq!(s.outcome(), Some(&FilterOutcome::Replied(Reply::new(554, (5, 7, 1), "Spam message rejected"))));
}

#[test]
fn a_filter_that_closes_times_out_or_says_421_has_failed() {
    let c = call(&["bob@example.com"]);
    let mut s = FilterSession::new("mx.test", &c, c.message.data.clone());
    s.handle_eof();
    assert!(matches!(s.outcome(), Some(FilterOutcome::Failed(_))));

    let mut s = FilterSession::new("mx.test", &c, c.message.data.clone());
    exchange(&mut s, "220 f\r\n");
    s.handle_timeout();
    assert!(matches!(s.outcome(), Some(FilterOutcome::Failed(_))));

    let mut s = FilterSession::new("mx.test", &c, c.message.data.clone());
    for r in ["220 f\r\n", "250 f\r\n", "250 ok\r\n", "250 ok\r\n", "354 go\r\n"] {
        exchange(&mut s, r);
    }
    exchange(&mut s, "421 4.3.0 shutting down\r\n");
    assert!(matches!(s.outcome(), Some(FilterOutcome::Failed(_))));

    // A refused XFORWARD is the filter's failure too.
    let mut s = FilterSession::new("mx.test", &c, c.message.data.clone());
    exchange(&mut s, "220 f\r\n");
    exchange(&mut s, "250-f\r\n250 XFORWARD NAME\r\n");
    exchange(&mut s, "550 no\r\n");
    assert!(matches!(s.outcome(), Some(FilterOutcome::Failed(_))));
}

#[test]
fn garbage_from_the_filter_is_a_failure_not_a_panic() {
    let c = call(&["bob@example.com"]);
    for junk in [&b"\xff\xfe\r\n"[..], b"2\r\n", b"999 x\r\n", b"250-a\r\n251 b\r\n", &[b'9'; 20000][..]] {
        let mut s = FilterSession::new("mx.test", &c, c.message.data.clone());
        s.handle_input(junk);
        s.handle_eof();
        assert!(matches!(s.outcome(), Some(FilterOutcome::Failed(_))), "{junk:?}");
    }
}

#[test]
fn xforward_attributes_follow_postfix() {
    let mut f = crate::eval::Facts {
        client_ip: "2001:db8::7".parse().unwrap_or(std::net::IpAddr::from([0, 0, 0, 0])),
        client_name: "unknown".into(),
        ..Default::default()
    };
    f.helo = Some(("client.test".into(), true));
    let a = xforward_attributes(&f, false);
    let get = |n: &str| a.iter().find(|(k, _)| *k == n).map(|(_, v)| v.clone()).unwrap_or_default();
    assert_eq!(get("NAME"), "[UNAVAILABLE]");
    assert_eq!(get("ADDR"), "IPV6:2001:db8::7");
    assert_eq!(get("PROTO"), "ESMTP");
    assert_eq!(get("HELO"), "client.test");
    assert_eq!(get("SOURCE"), "REMOTE");
}

/// The fuzz body on 20,000 inputs made of reply pieces (the stable twin of the
/// `filter_replies` target).
#[test]
fn fuzz_replies_20k() {
    let mut s: u64 = 0x5eed_0016_0000_0044;
    let mut next = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let pieces: [&[u8]; 12] = [
        b"220 filter ESMTP\r\n",
        b"250-filter\r\n250 XFORWARD NAME ADDR\r\n",
        b"250 2.0.0 Ok\r\n",
        b"354 go\r\n",
        b"550 5.1.1 no\r\n",
        b"451 4.3.0 later\r\n",
        b"421 bye\r\n",
        b"250-",
        b"\r\n",
        b"999 x\r\n",
        b"\xff\xfe",
        b"250 ",
    ];
    for _ in 0..20_000 {
        let n = (next() % 12) as usize;
        let mut input = vec![(next() % 40) as u8];
        for _ in 0..n {
            input.extend_from_slice(pieces[(next() % 12) as usize]);
        }
        fuzz_replies(&input);
    }
}
