//! Session tests: every command, extension, limit and error path.

use std::time::Duration;

use super::session::BASE64;
use super::*;
use base64::Engine as _;

type Policy = Box<dyn FnMut(&Event) -> Decision>;

/// Drives a session like a host would. Events needing a decision go to
/// `policy` (unless `manual`); SASL PLAIN/LOGIN are answered with the
/// credentials alice/secret; timers are fired by advancing the clock.
struct H {
    s: Session,
    now: Time,
    out: Vec<u8>,
    events: Vec<Event>,
    policy: Policy,
    manual: bool,
}

fn cfg() -> Config {
    Config { hostname: "mx.example".into(), ..Config::default() }
}

fn accept_all() -> Policy {
    Box::new(|_| Decision::accept())
}

/// Rejects recipients whose local part starts with "bad", queues as Q1.
fn simple_policy() -> Policy {
    Box::new(|e| match e {
        Event::Rcpt { to: ForwardPath::Mailbox(m), .. } if m.local.starts_with("bad") => {
            Decision::reject(Reply::new(550, (5, 1, 1), "User unknown"))
        }
        Event::Message { .. } => Decision::queued("Q1"),
        _ => Decision::accept(),
    })
}

impl H {
    fn new(config: Config, policy: Policy) -> H {
        let mut h = H {
            s: Session::new(config, PeerInfo::default(), Time(0)),
            now: Time(0),
            out: Vec::new(),
            events: Vec::new(),
            policy,
            manual: false,
        };
        h.pump();
        h
    }

    fn manual(config: Config) -> H {
        let mut h = H {
            s: Session::new(config, PeerInfo::default(), Time(0)),
            now: Time(0),
            out: Vec::new(),
            events: Vec::new(),
            policy: accept_all(),
            manual: true,
        };
        h.drain();
        while let Some(ev) = h.s.poll_event() {
            h.events.push(ev);
        }
        h
    }

    fn answer(&mut self, ev: &Event) {
        let now = self.now;
        match ev {
            Event::AuthStep { data, .. } => match data {
                None => self.s.auth_continue(b"", now).unwrap(),
                Some(d) if d.as_slice() == b"\0alice\0secret" => {
                    self.s.auth_done(AuthOutcome::Success { user: "alice".into() }, now).unwrap()
                }
                Some(_) => self.s.auth_done(AuthOutcome::Failure { reply: None }, now).unwrap(),
            },
            Event::StartTls => {}
            e if e.needs_answer() => {
                let d = (self.policy)(e);
                self.s.decide(d, now).unwrap();
            }
            _ => {}
        }
    }

    fn drain(&mut self) -> bool {
        let mut progressed = false;
        while let Some(b) = self.s.poll_transmit() {
            self.out.extend_from_slice(&b);
            progressed = true;
        }
        progressed
    }

    fn pump(&mut self) {
        loop {
            let mut progressed = self.drain();
            while let Some(ev) = self.s.poll_event() {
                progressed = true;
                if !self.manual {
                    self.answer(&ev);
                }
                self.events.push(ev);
                self.drain();
            }
            if !progressed {
                if let Some(t) = self.s.poll_timeout() {
                    self.now = self.now.max(t);
                    self.s.handle_timeout(self.now);
                    continue;
                }
                break;
            }
        }
    }

    fn send(&mut self, bytes: &[u8]) -> &mut H {
        self.s.handle_input(bytes, self.now);
        if self.manual {
            self.drain();
            while let Some(ev) = self.s.poll_event() {
                self.events.push(ev);
            }
        } else {
            self.pump();
        }
        self
    }

    /// Output so far as text, `\r\n` shown as `\n`; clears it.
    fn take(&mut self) -> String {
        self.drain();
        let s = String::from_utf8_lossy(&self.out).replace("\r\n", "\n");
        self.out.clear();
        s
    }

    /// Final lines of each reply since the last call.
    fn finals(&mut self) -> Vec<String> {
        self.take().lines().filter(|l| l.len() == 3 || l.as_bytes().get(3) == Some(&b' ')).map(str::to_string).collect()
    }

    fn messages(&self) -> Vec<(Envelope, Vec<u8>)> {
        self.events
            .iter()
            .filter_map(|e| match e {
                Event::Message { envelope, data, .. } => Some((envelope.clone(), data.clone())),
                _ => None,
            })
            .collect()
    }
}

/// Runs `input` (one packet) through a session with `policy`; returns final reply lines.
fn run(config: Config, policy: Policy, input: &[u8]) -> Vec<String> {
    let mut h = H::new(config, policy);
    h.send(input);
    h.finals()
}

fn check(input: &str, expect: &[&str]) {
    let got = run(cfg(), simple_policy(), input.as_bytes());
    let mut want = vec!["220 mx.example ESMTP mailpolicy"];
    want.extend_from_slice(expect);
    assert_eq!(got, want, "input: {input:?}");
}

const EHLO: &str = "EHLO c.example\r\n";

#[test]
fn full_transcript_exact() {
    let mut h = H::new(cfg(), simple_policy());
    h.send(b"EHLO client.example\r\n");
    assert_eq!(
        h.take(),
        "220 mx.example ESMTP mailpolicy\n250-mx.example Hello client.example\n250-PIPELINING\n\
         250-SIZE 10240000\n250-8BITMIME\n250-SMTPUTF8\n250-ENHANCEDSTATUSCODES\n250-DSN\n\
         250-CHUNKING\n250 BINARYMIME\n"
    );
    h.send(b"MAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example>\r\nDATA\r\n");
    assert_eq!(h.take(), "250 2.1.0 Sender OK\n250 2.1.5 Recipient OK\n354 End data with <CR><LF>.<CR><LF>\n");
    h.send(b"Subject: hi\r\n\r\n..leading dot\r\nbody\r\n.\r\nQUIT\r\n");
    assert_eq!(h.take(), "250 2.0.0 Queued as Q1\n221 2.0.0 mx.example closing connection\n");
    assert!(h.s.is_closed());
    let msgs = h.messages();
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0].1, b"Subject: hi\r\n\r\n.leading dot\r\nbody\r\n");
    assert_eq!(msgs[0].0.recipients.len(), 1);
    assert!(matches!(h.events.last(), Some(Event::Closed)));
    assert!(h.events.contains(&Event::Quit));
}

#[test]
fn helo_and_basic_commands() {
    check("HELO c.example\r\n", &["250 mx.example Hello c.example"]);
    check("HELO\r\n", &["501 5.5.4 Syntax: HELO hostname"]);
    check("EHLO a b\r\n", &["501 5.5.4 Syntax: EHLO hostname"]);
    check("NOOP\r\nNOOP whatever\r\n", &["250 2.0.0 OK", "250 2.0.0 OK"]);
    check("HELP\r\n", &["214 2.0.0 Commands: HELO EHLO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP STARTTLS AUTH"]);
    check("VRFY root\r\n", &["252 2.5.2 Cannot VRFY user, but will accept message and attempt delivery"]);
    check("VRFY\r\n", &["501 5.5.4 Syntax: VRFY address"]);
    check("EXPN staff\r\n", &["502 5.5.1 EXPN not available"]);
    check("FOO\r\n", &["500 5.5.2 Command unrecognized"]);
    check("TURN\r\nETRN x\r\n", &["502 5.5.1 Command not implemented", "502 5.5.1 Command not implemented"]);
    check("RSET x\r\nQUIT x\r\n", &["501 5.5.4 Syntax: RSET", "501 5.5.4 Syntax: QUIT"]);
    check("GET / HTTP/1.0\r\nNOOP\r\n", &["521 5.5.1 Protocol error"]);
    check("QUIT\r\nNOOP\r\n", &["221 2.0.0 mx.example closing connection"]);
    check("noop\r\nqUiT\r\n", &["250 2.0.0 OK", "221 2.0.0 mx.example closing connection"]);
}

#[test]
fn line_rules() {
    let long = format!("NOOP {}\r\nNOOP\r\n", "x".repeat(600));
    check(&long, &["500 5.5.6 Line too long", "250 2.0.0 OK"]);
    // exactly 512 octets with CRLF is fine, 513 is not
    let ok = format!("NOOP {}\r\n", "x".repeat(512 - 7));
    assert_eq!(ok.len(), 512);
    check(&ok, &["250 2.0.0 OK"]);
    let bad = format!("NOOP {}\r\n", "x".repeat(512 - 6));
    check(&bad, &["500 5.5.6 Line too long"]);
    check("NOOP\nNOOP\r\n", &["500 5.5.2 Bare LF received; lines must end with CRLF", "250 2.0.0 OK"]);
    check("NO\rOP\r\n", &["500 5.5.2 Invalid characters in command"]);
    check("NOOP \x00\r\n", &["500 5.5.2 Invalid characters in command"]);
    let f = run(cfg(), accept_all(), b"NOOP \xff\r\n");
    assert_eq!(f[1], "500 5.5.2 Invalid characters in command");
    // an over-long line arriving in pieces is dropped without buffering it all
    let mut h = H::new(cfg(), accept_all());
    for _ in 0..100 {
        h.send(&[b'x'; 100]);
    }
    assert!(h.s.input_room() >= cfg().max_input_buffer - 600);
    h.send(b"\r\nNOOP\r\n");
    assert_eq!(h.finals()[1..], ["500 5.5.6 Line too long", "250 2.0.0 OK"]);
}

#[test]
fn sequencing() {
    check("MAIL FROM:<a@b.example>\r\n", &["503 5.5.1 Send HELO/EHLO first"]);
    check(&format!("{EHLO}RCPT TO:<a@b.example>\r\n"), &[EHLO_LAST_NOAUTH, "503 5.5.1 Need MAIL command"]);
    check(
        &format!("{EHLO}MAIL FROM:<a@b.example>\r\nMAIL FROM:<a@b.example>\r\n"),
        &[EHLO_LAST_NOAUTH, "250 2.1.0 Sender OK", "503 5.5.1 Nested MAIL command"],
    );
    check(&format!("{EHLO}DATA\r\n"), &[EHLO_LAST_NOAUTH, "503 5.5.1 Need MAIL command"]);
    check(
        &format!("{EHLO}MAIL FROM:<a@b.example>\r\nRCPT TO:<bad@b.example>\r\nDATA\r\n"),
        &[EHLO_LAST_NOAUTH, "250 2.1.0 Sender OK", "550 5.1.1 User unknown", "554 5.5.1 No valid recipients"],
    );
    check(
        &format!("{EHLO}MAIL FROM:<a@b.example>\r\nRSET\r\nRCPT TO:<c@d.example>\r\n"),
        &[EHLO_LAST_NOAUTH, "250 2.1.0 Sender OK", "250 2.0.0 OK", "503 5.5.1 Need MAIL command"],
    );
    // EHLO resets the transaction
    check(
        &format!("{EHLO}MAIL FROM:<a@b.example>\r\n{EHLO}RCPT TO:<c@d.example>\r\n"),
        &[EHLO_LAST_NOAUTH, "250 2.1.0 Sender OK", EHLO_LAST_NOAUTH, "503 5.5.1 Need MAIL command"],
    );
    check(&format!("{EHLO}DATA x\r\n"), &[EHLO_LAST_NOAUTH, "501 5.5.4 Syntax: DATA"]);
}

const EHLO_LAST_NOAUTH: &str = "250 BINARYMIME";

#[test]
fn paths() {
    let t = |mail: &str, rcpt: &str| {
        run(cfg(), simple_policy(), format!("{EHLO}MAIL FROM:{mail}\r\nRCPT TO:{rcpt}\r\n").as_bytes())[2..].to_vec()
    };
    assert_eq!(t("<>", "<postmaster>"), ["250 2.1.0 Sender OK", "250 2.1.5 Recipient OK"]);
    assert_eq!(t("<>", "<PostMaster>"), ["250 2.1.0 Sender OK", "250 2.1.5 Recipient OK"]);
    assert_eq!(t(" <a@b.example>", "<\"john doe\"@example.com>"), ["250 2.1.0 Sender OK", "250 2.1.5 Recipient OK"]);
    assert_eq!(
        t("<@r1.example,@r2.example:a@b.example>", "<x%y@z.example>"),
        ["250 2.1.0 Sender OK", "250 2.1.5 Recipient OK"]
    );
    assert_eq!(t("<postmaster>", "<>"), ["501 5.1.7 Bad sender address syntax", "503 5.5.1 Need MAIL command"]);
    assert_eq!(t("a@b.example", "<a@b>"), ["501 5.1.7 Syntax: MAIL FROM:<address>", "503 5.5.1 Need MAIL command"]);
    assert_eq!(t("<a@b.example>", "<>"), ["250 2.1.0 Sender OK", "501 5.1.3 Bad recipient address syntax"]);
    assert_eq!(t("<a@b.example>", "c@d"), ["250 2.1.0 Sender OK", "501 5.1.3 Syntax: RCPT TO:<address>"]);
    assert_eq!(t("<a@b.example>", "<c@d..e>"), ["250 2.1.0 Sender OK", "501 5.1.3 Bad recipient address syntax"]);
    assert_eq!(t("  <a@b.example>", "<c@d>"), ["501 5.1.7 Syntax: MAIL FROM:<address>", "503 5.5.1 Need MAIL command"]);
    assert_eq!(t("<a@b.example>x", "<c@d>"), ["501 5.1.7 Syntax: MAIL FROM:<address>", "503 5.5.1 Need MAIL command"]);
    assert_eq!(
        t("<jörg@b.example>", "<c@d>"),
        ["553 5.6.7 Non-ASCII addresses require SMTPUTF8", "503 5.5.1 Need MAIL command"]
    );
    assert_eq!(t("<jörg@b.example> SMTPUTF8", "<ä@d.example>"), ["250 2.1.0 Sender OK", "250 2.1.5 Recipient OK"]);
    assert_eq!(
        t("<a@b.example>", "<ä@d.example>"),
        ["250 2.1.0 Sender OK", "553 5.6.7 Non-ASCII addresses require SMTPUTF8"]
    );

    // the event carries the raw local part: % and ! are not interpreted
    let mut h = H::new(cfg(), accept_all());
    h.send(format!("{EHLO}MAIL FROM:<>\r\nRCPT TO:<@hop.example:a!b%c@d.example>\r\n").as_bytes());
    let rcpt = h.events.iter().find_map(|e| match e {
        Event::Rcpt { to, .. } => Some(to.clone()),
        _ => None,
    });
    assert_eq!(
        rcpt,
        Some(ForwardPath::Mailbox(Mailbox {
            local: "a!b%c".into(),
            quoted: false,
            domain: "d.example".into(),
            routed: true
        }))
    );
    assert!(h.events.contains(&Event::Mail { from: ReversePath::Null, params: MailParams::default() }));
}

#[test]
fn parameters() {
    let t = |mail: &str, rcpt: &str| {
        let mut h = H::new(cfg(), accept_all());
        h.send(format!("{EHLO}MAIL FROM:<a@b.example>{mail}\r\nRCPT TO:<c@d.example>{rcpt}\r\n").as_bytes());
        let f = h.finals()[2..].to_vec();
        (f, h.events)
    };
    let (f, ev) =
        t(" SIZE=1000 BODY=8BITMIME RET=HDRS ENVID=abc+2Bdef", " NOTIFY=SUCCESS,DELAY ORCPT=rfc822;c+2Bx@d.example");
    assert_eq!(f, ["250 2.1.0 Sender OK", "250 2.1.5 Recipient OK"]);
    let mail = ev.iter().find_map(|e| match e {
        Event::Mail { params, .. } => Some(params.clone()),
        _ => None,
    });
    assert_eq!(
        mail,
        Some(MailParams {
            size: Some(1000),
            body: BodyType::EightBitMime,
            smtputf8: false,
            ret: Some(Ret::Hdrs),
            envid: Some("abc+def".into()),
            auth: None,
        })
    );
    let rcpt = ev.iter().find_map(|e| match e {
        Event::Rcpt { params, .. } => Some(params.clone()),
        _ => None,
    });
    assert_eq!(
        rcpt,
        Some(RcptParams {
            notify: Some(Notify { never: false, success: true, failure: false, delay: true }),
            orcpt: Some(Orcpt { addr_type: "rfc822".into(), address: "c+x@d.example".into() }),
        })
    );
    assert_eq!(t(" SIZE=10240001", "").0[0], "552 5.3.4 Message size exceeds fixed maximum message size");
    assert_eq!(t(" FOO=1", "").0[0], "555 5.5.4 Unsupported parameter");
    assert_eq!(t(" RET=SOME", "").0[0], "501 5.5.4 Invalid RET value");
    assert_eq!(t(" ENVID=a+zz", "").0[0], "501 5.5.4 Invalid ENVID value");
    assert_eq!(t("", " NOTIFY=NEVER,SUCCESS").0[1], "501 5.5.4 NOTIFY=NEVER must be alone");
    assert_eq!(t("", " NOTIFY=MAYBE").0[1], "501 5.5.4 Invalid NOTIFY value");
    assert_eq!(t("", " ORCPT=rfc822").0[1], "501 5.5.4 Invalid ORCPT value");
    assert_eq!(t("", " XYZ").0[1], "555 5.5.4 Unsupported parameter");
    // parameters need EHLO
    let f = run(cfg(), accept_all(), b"HELO c\r\nMAIL FROM:<a@b.example> SIZE=10\r\n");
    assert_eq!(f[2], "555 5.5.4 Unsupported parameter");
    // DSN not offered -> NOTIFY unsupported
    let mut c = cfg();
    c.extensions.dsn = false;
    let f = run(c, accept_all(), format!("{EHLO}MAIL FROM:<a@b.example> RET=FULL\r\n").as_bytes());
    assert_eq!(f.last().map(String::as_str), Some("555 5.5.4 Unsupported parameter"));
}

#[test]
fn recipient_limit_counts_accepted_only() {
    let mut c = cfg();
    c.max_recipients = 2;
    let f = run(
        c,
        simple_policy(),
        format!(
            "{EHLO}MAIL FROM:<a@b.example>\r\nRCPT TO:<bad1@x.example>\r\nRCPT TO:<r1@x.example>\r\n\
             RCPT TO:<bad2@x.example>\r\nRCPT TO:<r2@x.example>\r\nRCPT TO:<r3@x.example>\r\n"
        )
        .as_bytes(),
    );
    assert_eq!(
        f[2..],
        [
            "250 2.1.0 Sender OK",
            "550 5.1.1 User unknown",
            "250 2.1.5 Recipient OK",
            "550 5.1.1 User unknown",
            "250 2.1.5 Recipient OK",
            "452 4.5.3 Too many recipients"
        ]
    );
}

#[test]
fn envelope_holds_accepted_recipients() {
    let mut h = H::new(cfg(), simple_policy());
    h.send(
        format!(
            "{EHLO}MAIL FROM:<a@b.example>\r\nRCPT TO:<r1@x.example>\r\nRCPT TO:<bad@x.example>\r\n\
             RCPT TO:<r2@x.example>\r\nDATA\r\nhello\r\n.\r\n"
        )
        .as_bytes(),
    );
    let m = h.messages();
    assert_eq!(m.len(), 1);
    let locals: Vec<String> = m[0]
        .0
        .recipients
        .iter()
        .map(|r| match &r.path {
            ForwardPath::Mailbox(m) => m.local.clone(),
            ForwardPath::Postmaster => "postmaster".into(),
        })
        .collect();
    assert_eq!(locals, ["r1", "r2"]);
    assert_eq!(m[0].1, b"hello\r\n");
}

fn data_session(body: &[u8]) -> (Vec<String>, Vec<(Envelope, Vec<u8>)>) {
    data_session_cfg(cfg(), body)
}

fn data_session_cfg(c: Config, body: &[u8]) -> (Vec<String>, Vec<(Envelope, Vec<u8>)>) {
    let mut h = H::new(c, simple_policy());
    h.send(format!("{EHLO}MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n").as_bytes());
    h.finals();
    h.send(body);
    (h.finals(), h.messages())
}

#[test]
fn smuggling_variants_never_split_a_message() {
    for smuggle in [&b"\n.\n"[..], b"\n.\r\n", b"\r.\r\n", b"\r\n.\n", b"\r\n\x00.\r\n", b"\r\n.\r", b".\r", b"\n.\r"] {
        let mut body = b"Subject: x\r\n\r\nline".to_vec();
        body.extend_from_slice(smuggle);
        body.extend_from_slice(
            b"MAIL FROM:<evil@x.example>\r\nRCPT TO:<victim@y.example>\r\nDATA\r\nforged\r\n.\r\nNOOP\r\n",
        );
        let (f, msgs) = data_session(&body);
        let name = String::from_utf8_lossy(smuggle).escape_debug().to_string();
        if smuggle == b"\r\n\x00.\r\n" {
            // no bare line ending: one message whose content contains everything
            assert_eq!(f, ["250 2.0.0 Queued as Q1", "250 2.0.0 OK"], "{name}");
            assert_eq!(msgs.len(), 1);
            assert!(msgs[0].1.windows(5).any(|w| w == b"evil@"));
        } else {
            assert_eq!(
                f,
                ["550 5.5.2 Message contains bare CR or LF; lines must end with CRLF", "250 2.0.0 OK"],
                "{name}"
            );
            assert!(msgs.is_empty(), "{name}");
        }
    }
}

#[test]
fn data_limits() {
    let mut c = cfg();
    c.max_message_size = 100;
    let mut body = b"Subject: x\r\n\r\n".to_vec();
    body.extend_from_slice(&[b'a'; 200]);
    body.extend_from_slice(b"\r\n.\r\nNOOP\r\n");
    let (f, m) = data_session_cfg(c.clone(), &body);
    assert_eq!(f, ["552 5.3.4 Message size exceeds fixed maximum message size", "250 2.0.0 OK"]);
    assert!(m.is_empty());
    // exactly at the limit is fine
    let mut body = vec![b'a'; 98];
    body.extend_from_slice(b"\r\n.\r\n");
    assert_eq!(data_session_cfg(c, &body).0, ["250 2.0.0 Queued as Q1"]);

    // A line over 998 octets is accepted (RFC 5322's limit is on senders), whole.
    let mut body = b"Subject: x\r\n\r\n".to_vec();
    body.extend_from_slice(&[b'a'; 5000]);
    body.extend_from_slice(b"\r\n.\r\n");
    let (f, m) = data_session(&body);
    assert_eq!(f, ["250 2.0.0 Queued as Q1"]);
    assert!(m.first().is_some_and(|(_, m)| m.windows(5000).any(|w| w.iter().all(|b| *b == b'a'))));

    let mut c = cfg();
    c.max_header_size = 50;
    let (f, _) = data_session_cfg(c, format!("Subject: {}\r\n\r\nbody\r\n.\r\n", "x".repeat(60)).as_bytes());
    assert_eq!(f, ["552 5.3.4 Message header size exceeds limit"]);

    // empty message
    let (f, m) = data_session(b".\r\n");
    assert_eq!(f, ["250 2.0.0 Queued as Q1"]);
    assert_eq!(m[0].1, b"");
}

#[test]
fn pipelining_waits_for_decisions() {
    let mut h = H::manual(cfg());
    assert_eq!(h.events, [Event::Connect]);
    // talking now would be talk-first, so decide first
    h.s.decide(Decision::accept(), Time(0)).unwrap();
    h.take();
    h.send(
        format!("{EHLO}MAIL FROM:<a@b.example>\r\nRCPT TO:<x@d.example>\r\nRCPT TO:<y@d.example>\r\nDATA\r\nbody\r\n.\r\nQUIT\r\n")
            .as_bytes(),
    );
    // only the EHLO event, no reply yet
    assert_eq!(h.take(), "");
    assert_eq!(h.events.len(), 2);
    assert!(h.s.decide(Decision::accept(), Time(0)).is_ok());
    let out = h.take();
    assert!(out.starts_with("250-mx.example"));
    h.send(b"");
    assert!(matches!(h.events.last(), Some(Event::Mail { .. })));
    h.s.decide(Decision::accept(), Time(0)).unwrap();
    h.send(b"");
    assert_eq!(h.take(), "250 2.1.0 Sender OK\n");
    h.s.decide(Decision::reject(Reply::new(450, (4, 2, 0), "later")), Time(0)).unwrap();
    h.s.decide(Decision::accept(), Time(0)).unwrap();
    h.send(b"");
    assert_eq!(h.take(), "450 4.2.0 later\n250 2.1.5 Recipient OK\n");
    assert_eq!(h.events.last(), Some(&Event::Data { chunked: false }));
    h.s.decide(Decision::accept(), Time(0)).unwrap();
    h.send(b"");
    assert!(matches!(h.events.last(), Some(Event::Message { .. })));
    assert_eq!(h.take(), "354 End data with <CR><LF>.<CR><LF>\n");
    assert_eq!(h.s.decide(Decision::queued("ABC"), Time(0)), Ok(()));
    h.send(b"");
    assert_eq!(h.take(), "250 2.0.0 Queued as ABC\n221 2.0.0 mx.example closing connection\n");
    assert_eq!(h.s.decide(Decision::accept(), Time(0)), Err(UsageError::Closed));
}

#[test]
fn usage_errors() {
    let mut h = H::new(cfg(), accept_all());
    assert_eq!(h.s.decide(Decision::accept(), Time(0)), Err(UsageError::NotWaiting));
    assert_eq!(h.s.auth_continue(b"", Time(0)), Err(UsageError::NotWaiting));
    assert_eq!(h.s.tls_established(TlsInfo::default(), Time(0)), Err(UsageError::NotWaiting));
}

/// A representative session: EHLO, two transactions (DATA and BDAT), RSET,
/// rejected recipient, NOOP, QUIT.
const REPRESENTATIVE: &[u8] = b"EHLO client.example\r\n\
MAIL FROM:<a@b.example> SIZE=100\r\nRCPT TO:<bad@x.example>\r\nRCPT TO:<c@x.example> NOTIFY=NEVER\r\n\
DATA\r\nSubject: t\r\n\r\n..x\r\n.\r\r\nend\r\n.\r\nRSET\r\nNOOP\r\n\
MAIL FROM:<> BODY=BINARYMIME\r\nRCPT TO:<postmaster>\r\nBDAT 6\r\nab\ncd\rBDAT 3 LAST\r\nxyz\
MAIL FROM:<q@b.example>\r\nRCPT TO:<r@x.example>\r\nBDAT 0 LAST\r\nQUIT\r\n";

fn run_split(pieces: &[&[u8]]) -> (String, Vec<Vec<u8>>) {
    let mut h = H::new(cfg(), simple_policy());
    for p in pieces {
        h.send(p);
    }
    let msgs = h.messages().into_iter().map(|(_, d)| d).collect();
    (h.take(), msgs)
}

#[test]
fn split_at_every_offset_gives_same_replies() {
    let (whole, msgs) = run_split(&[REPRESENTATIVE]);
    assert_eq!(
        whole.lines().filter(|l| l.as_bytes().get(3) == Some(&b' ')).collect::<Vec<_>>(),
        [
            "220 mx.example ESMTP mailpolicy",
            "250 BINARYMIME",
            "250 2.1.0 Sender OK",
            "550 5.1.1 User unknown",
            "250 2.1.5 Recipient OK",
            "354 End data with <CR><LF>.<CR><LF>",
            "550 5.5.2 Message contains bare CR or LF; lines must end with CRLF",
            "250 2.0.0 OK",
            "250 2.0.0 OK",
            "250 2.1.0 Sender OK",
            "250 2.1.5 Recipient OK",
            "250 2.0.0 6 octets received",
            "250 2.0.0 Queued as Q1",
            "250 2.1.0 Sender OK",
            "250 2.1.5 Recipient OK",
            "250 2.0.0 Queued as Q1",
            "221 2.0.0 mx.example closing connection",
        ]
    );
    assert_eq!(msgs, [b"ab\ncd\rxyz".to_vec(), Vec::new()]);
    for i in 0..=REPRESENTATIVE.len() {
        let (a, b) = REPRESENTATIVE.split_at(i);
        assert_eq!(run_split(&[a, b]), (whole.clone(), msgs.clone()), "split at {i}");
    }
    let bytes: Vec<&[u8]> = REPRESENTATIVE.chunks(1).collect();
    assert_eq!(run_split(&bytes), (whole, msgs));
}

#[test]
fn bdat() {
    let base = format!("{EHLO}MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\n");
    let mut h = H::new(cfg(), simple_policy());
    h.send(format!("{base}BDAT 6\r\nHello\nBDAT 0 LAST\r\n").as_bytes());
    // bare LF without BINARYMIME is rejected
    assert_eq!(
        h.finals()[4..],
        ["250 2.0.0 6 octets received", "550 5.5.2 Message contains bare CR or LF; lines must end with CRLF"]
    );
    let mut h = H::new(cfg(), simple_policy());
    h.send(format!("{base}BDAT 7\r\nHello\r\nBDAT 5 LAST\r\nWorld").as_bytes());
    assert_eq!(h.finals()[4..], ["250 2.0.0 7 octets received", "250 2.0.0 Queued as Q1"]);
    assert_eq!(h.messages()[0].1, b"Hello\r\nWorld");
    assert!(h.events.contains(&Event::Data { chunked: true }));
    // DATA after BDAT
    let f = run(cfg(), simple_policy(), format!("{base}BDAT 2\r\nabDATA\r\n").as_bytes());
    assert_eq!(f[4..], ["250 2.0.0 2 octets received", "503 5.5.1 DATA not allowed after BDAT"]);
    // BDAT without recipients: the chunk is consumed, then 554
    let f = run(
        cfg(),
        simple_policy(),
        format!("{EHLO}MAIL FROM:<a@b.example>\r\nBDAT 6 LAST\r\nNOOP\r\nNOOP\r\n").as_bytes(),
    );
    assert_eq!(f[2..], ["250 2.1.0 Sender OK", "554 5.5.1 No valid recipients", "250 2.0.0 OK"]);
    let f = run(cfg(), simple_policy(), format!("{EHLO}BDAT 4\r\nQUITNOOP\r\n").as_bytes());
    assert_eq!(f[2..], ["503 5.5.1 Need MAIL command", "250 2.0.0 OK"]);
    // malformed BDAT closes
    for bad in ["BDAT\r\n", "BDAT x\r\n", "BDAT 5 FIRST\r\n", "BDAT 99999999999999999999999\r\n", "BDAT 1 LAST x\r\n"] {
        let mut h = H::new(cfg(), simple_policy());
        h.send(format!("{base}{bad}NOOP\r\n").as_bytes());
        assert_eq!(h.finals().last().map(String::as_str), Some("501 5.5.4 Syntax: BDAT size [LAST]"), "{bad}");
        assert!(h.s.is_closed());
    }
    // BINARYMIME needs BDAT
    let f = run(
        cfg(),
        simple_policy(),
        format!("{EHLO}MAIL FROM:<a@b.example> BODY=BINARYMIME\r\nRCPT TO:<c@d.example>\r\nDATA\r\n").as_bytes(),
    );
    assert_eq!(f[4], "503 5.5.1 BODY=BINARYMIME requires BDAT");
    // rejected first BDAT: chunk discarded, transaction gone
    let mut h = H::new(
        cfg(),
        Box::new(|e| match e {
            Event::Data { .. } => Decision::reject(Reply::new(554, (5, 7, 1), "no data today")),
            _ => Decision::accept(),
        }),
    );
    h.send(format!("{base}BDAT 4\r\nRSETBDAT 1 LAST\r\nxNOOP\r\n").as_bytes());
    assert_eq!(h.finals()[4..], ["554 5.7.1 no data today", "503 5.5.1 Need MAIL command", "250 2.0.0 OK"]);
    assert!(h.events.contains(&Event::Reset));
    // size limit across chunks
    let mut c = cfg();
    c.max_message_size = 10;
    let f =
        run(c, simple_policy(), format!("{base}BDAT 6\r\n123456BDAT 6\r\n123456BDAT 1 LAST\r\nxNOOP\r\n").as_bytes());
    assert_eq!(
        f[4..],
        [
            "250 2.0.0 6 octets received",
            "552 5.3.4 Message size exceeds fixed maximum message size",
            "503 5.5.1 Need MAIL command",
            "250 2.0.0 OK"
        ]
    );
    // chunking off: BDAT refused but its chunk is still consumed
    let mut c = cfg();
    c.extensions.chunking = false;
    let f = run(c, simple_policy(), format!("{base}BDAT 4\r\nQUITNOOP\r\n").as_bytes());
    assert_eq!(f.last().map(String::as_str), Some("250 2.0.0 OK"));
}

#[test]
fn starttls_discards_injected_commands() {
    let mut c = cfg();
    c.tls_available = true;
    c.auth_mechanisms = vec!["PLAIN".into()];
    let mut h = H::new(c, simple_policy());
    h.send(EHLO.as_bytes());
    let ehlo = h.take();
    assert!(ehlo.ends_with("250 STARTTLS\n"));
    assert!(!ehlo.contains("AUTH"));
    h.send(b"STARTTLS\r\nMAIL FROM:<evil@x.example>\r\nRCPT TO:<v@y.example>\r\n");
    assert_eq!(h.take(), "220 2.0.0 Ready to start TLS\n");
    assert!(h.events.contains(&Event::StartTls));
    // bytes fed while the handshake runs are ignored too
    h.send(b"NOOP\r\n");
    assert_eq!(h.take(), "");
    h.s.tls_established(
        TlsInfo { version: "TLSv1.3".into(), cipher: "TLS13_AES_128_GCM_SHA256".into(), ..TlsInfo::default() },
        h.now,
    )
    .unwrap();
    h.send(b"MAIL FROM:<a@b.example>\r\n");
    assert_eq!(h.take(), "503 5.5.1 Send HELO/EHLO first\n");
    assert!(!h.events.iter().any(|e| matches!(e, Event::Mail { .. })));
    h.send(EHLO.as_bytes());
    let ehlo = h.take();
    assert!(!ehlo.contains("STARTTLS"));
    assert!(ehlo.ends_with("250 AUTH PLAIN\n"));
    h.send(b"STARTTLS\r\nSTARTTLS x\r\n");
    assert_eq!(h.take(), "503 5.5.1 TLS already active\n501 5.5.4 Syntax: STARTTLS\n");
    assert_eq!(h.s.tls().map(|t| t.version.as_str()), Some("TLSv1.3"));
    // not available
    check("STARTTLS\r\n", &["502 5.5.1 STARTTLS not available"]);
}

fn auth_cfg() -> Config {
    let mut c = cfg();
    c.auth_mechanisms = vec!["PLAIN".into(), "LOGIN".into()];
    c.auth_requires_tls = false;
    c
}

#[test]
fn auth() {
    // "\0alice\0secret"
    let good = BASE64.encode(b"\0alice\0secret");
    let bad = BASE64.encode(b"\0alice\0wrong");
    let t = |c: Config, input: String| {
        let mut h = H::new(c, accept_all());
        h.send(input.as_bytes());
        let f = h.finals()[2..].to_vec();
        (f, h)
    };
    let (f, h) = t(auth_cfg(), format!("{EHLO}AUTH PLAIN {good}\r\nAUTH PLAIN {good}\r\n"));
    assert_eq!(f, ["235 2.7.0 Authentication successful", "503 5.5.1 Already authenticated"]);
    assert_eq!(h.s.authenticated(), Some(("PLAIN", "alice")));
    assert!(h.events.contains(&Event::Auth { mechanism: "PLAIN".into(), user: "alice".into() }));
    let (f, _) = t(auth_cfg(), format!("{EHLO}AUTH plain {bad}\r\n"));
    assert_eq!(f, ["535 5.7.8 Authentication credentials invalid"]);
    // no initial response: 334 challenge, then the response line
    let mut h = H::new(auth_cfg(), accept_all());
    h.send(format!("{EHLO}AUTH PLAIN\r\n").as_bytes());
    assert!(h.take().ends_with("334 \n"));
    h.send(format!("{good}\r\n").as_bytes());
    assert_eq!(h.take(), "235 2.7.0 Authentication successful\n");
    let (f, h) = t(auth_cfg(), format!("{EHLO}AUTH LOGIN\r\n*\r\nNOOP\r\n"));
    assert_eq!(f, ["334 ", "501 5.7.0 Authentication cancelled", "250 2.0.0 OK"]);
    assert!(h.events.contains(&Event::AuthCancelled));
    let (f, _) = t(auth_cfg(), format!("{EHLO}AUTH LOGIN\r\n!!notbase64\r\n"));
    assert_eq!(f, ["334 ", "501 5.5.2 Invalid base64 data"]);
    let (f, _) = t(auth_cfg(), format!("{EHLO}AUTH PLAIN ***\r\n"));
    assert_eq!(f, ["501 5.5.2 Invalid base64 data"]);
    // Only canonical base64: padding required, no stray bits, nothing after the padding.
    for bad in ["Zm9", "Zm9v=", "Zm==Zm9v", "Zm8", "Z===", "Zm9!", "Zm9=", "Zh=="] {
        let (f, _) = t(auth_cfg(), format!("{EHLO}AUTH PLAIN {bad}\r\n"));
        assert_eq!(f, ["501 5.5.2 Invalid base64 data"], "{bad}");
    }
    let (f, _) = t(auth_cfg(), format!("{EHLO}AUTH PLAIN =\r\n"));
    assert_eq!(f, ["535 5.7.8 Authentication credentials invalid"]);
    let (f, _) = t(auth_cfg(), format!("{EHLO}AUTH CRAM-MD5\r\nAUTH\r\n"));
    assert_eq!(
        f,
        ["504 5.5.4 Unrecognized authentication type", "501 5.5.4 Syntax: AUTH mechanism [initial-response]"]
    );
    let (f, _) = t(auth_cfg(), format!("{EHLO}MAIL FROM:<a@b.example>\r\nAUTH PLAIN {good}\r\n"));
    assert_eq!(f, ["250 2.1.0 Sender OK", "503 5.5.1 AUTH not allowed during a mail transaction"]);
    let (f, _) = t(auth_cfg(), format!("HELO x\r\nAUTH PLAIN {good}\r\n"));
    assert_eq!(f, ["503 5.5.1 Send EHLO first"]);
    let mut c = auth_cfg();
    c.auth_requires_tls = true;
    c.tls_available = true;
    let (f, _) = t(c, format!("{EHLO}AUTH PLAIN {good}\r\n"));
    assert_eq!(f, ["530 5.7.0 Must issue a STARTTLS command first"]);
    let (f, _) = t(cfg(), format!("{EHLO}AUTH PLAIN {good}\r\n"));
    assert_eq!(f, ["502 5.5.1 AUTH not available"]);
    // MAIL AUTH= parameter, accepted only when AUTH is offered
    let (f, h) = t(auth_cfg(), format!("{EHLO}MAIL FROM:<a@b.example> AUTH=a+2Bb@b.example\r\n"));
    assert_eq!(f, ["250 2.1.0 Sender OK"]);
    assert!(h
        .events
        .iter()
        .any(|e| matches!(e, Event::Mail { params, .. } if params.auth.as_deref() == Some("a+b@b.example"))));
    // the policy can refuse an authenticated user
    let mut h = H::new(
        auth_cfg(),
        Box::new(|e| match e {
            Event::Auth { .. } => Decision::reject(Reply::new(535, (5, 7, 8), "not you")),
            _ => Decision::accept(),
        }),
    );
    h.send(format!("{EHLO}AUTH PLAIN {good}\r\n").as_bytes());
    assert_eq!(h.finals().last().map(String::as_str), Some("535 5.7.8 not you"));
    assert_eq!(h.s.authenticated(), None);
    // long AUTH lines are allowed up to 12288
    let (f, _) = t(auth_cfg(), format!("{EHLO}AUTH PLAIN {}\r\n", "QUFB".repeat(1000)));
    assert_eq!(f, ["535 5.7.8 Authentication credentials invalid"]);
}

#[test]
fn greet_pause_and_talk_first() {
    let mut c = cfg();
    c.greet_pause = Duration::from_millis(700);
    let mut h = H::manual(c.clone());
    h.s.decide(Decision::accept(), Time(0)).unwrap();
    assert_eq!(h.s.poll_timeout(), Some(Time(700)));
    assert_eq!(h.take(), "");
    h.send(b"EHLO early\r\n");
    assert_eq!(h.take(), "554 5.5.1 Protocol error: client sent data before the greeting\n");
    assert!(h.s.is_closed());
    assert!(h.events.contains(&Event::Closed));
    // a patient client gets the banner at t=700
    let mut h = H::manual(c.clone());
    h.s.decide(Decision::accept(), Time(0)).unwrap();
    h.s.handle_timeout(Time(699));
    assert_eq!(h.take(), "");
    h.s.handle_timeout(Time(700));
    assert_eq!(h.take(), "220 mx.example ESMTP mailpolicy\n");
    h.send(b"NOOP\r\n");
    assert_eq!(h.take(), "250 2.0.0 OK\n");
    // talking before the Connect decision is also talk-first
    let mut h = H::manual(cfg());
    h.send(b"HELO x\r\n");
    assert!(h.s.is_closed());
    assert_eq!(h.s.decide(Decision::accept(), Time(0)), Err(UsageError::Closed));
    // connect decision delay works as greet pause too
    let mut h = H::manual(cfg());
    h.s.decide(Decision::accept().with_delay(Duration::from_secs(2)), Time(100)).unwrap();
    assert_eq!(h.s.poll_timeout(), Some(Time(2100)));
}

#[test]
fn connect_rejection() {
    let f = run(
        cfg(),
        Box::new(|e| match e {
            Event::Connect => Decision::reject(Reply::new(554, (5, 7, 1), "listed")),
            _ => Decision::accept(),
        }),
        b"EHLO x\r\nMAIL FROM:<a@b.example>\r\nQUIT\r\n",
    );
    assert_eq!(
        f,
        [
            "554 5.7.1 listed",
            "503 5.5.1 Bad sequence of commands",
            "503 5.5.1 Bad sequence of commands",
            "221 2.0.0 mx.example closing connection"
        ]
    );
    let mut h = H::new(cfg(), Box::new(|_| Decision::reject(Reply::new(421, (4, 7, 0), "go away")).with_close()));
    assert_eq!(h.take(), "421 4.7.0 go away\n");
    assert!(h.s.is_closed());
}

#[test]
fn error_limits_and_sleep() {
    let mut c = cfg();
    c.soft_error_limit = 2;
    c.hard_error_limit = 4;
    c.error_sleep = Duration::from_secs(1);
    let mut h = H::manual(c);
    h.s.decide(Decision::accept(), Time(0)).unwrap();
    h.take();
    h.send(b"X1\r\nX2\r\nNOOP\r\nX3\r\nX4\r\nNOOP\r\n");
    // the errors up to the soft limit are immediate; the third (past the limit) is held 1s
    assert_eq!(h.take(), "500 5.5.2 Command unrecognized\n500 5.5.2 Command unrecognized\n250 2.0.0 OK\n");
    assert_eq!(h.s.poll_timeout(), Some(Time(1000)));
    h.s.handle_timeout(Time(1000));
    assert_eq!(h.take(), "500 5.5.2 Command unrecognized\n");
    h.s.handle_timeout(Time(2000));
    assert_eq!(h.take(), "500 5.5.2 Command unrecognized\n421 4.7.0 mx.example Error: too many errors\n");
    assert!(h.s.is_closed());
    assert_eq!(h.s.error_count(), 4);
}

#[test]
fn policy_rejections_count_and_delivery_resets() {
    let mut c = cfg();
    c.hard_error_limit = 3;
    c.soft_error_limit = 100;
    let f = run(
        c.clone(),
        simple_policy(),
        format!(
            "{EHLO}MAIL FROM:<a@b.example>\r\nRCPT TO:<bad1@x>\r\nRCPT TO:<bad2@x>\r\nRCPT TO:<bad3@x>\r\nNOOP\r\n"
        )
        .as_bytes(),
    );
    assert_eq!(f.last().map(String::as_str), Some("421 4.7.0 mx.example Error: too many errors"));
    let mut h = H::new(c, simple_policy());
    h.send(
        format!("{EHLO}X\r\nX\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@x>\r\nDATA\r\nx\r\n.\r\nX\r\nX\r\nNOOP\r\n")
            .as_bytes(),
    );
    assert_eq!(h.finals().last().map(String::as_str), Some("250 2.0.0 OK"));
}

#[test]
fn decision_reply_close_and_tarpit() {
    let mut h = H::manual(cfg());
    h.s.decide(Decision::accept(), Time(0)).unwrap();
    h.send(format!("{EHLO}MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nNOOP\r\n").as_bytes());
    h.s.decide(Decision::accept(), Time(0)).unwrap();
    h.s.decide(Decision::accept(), Time(0)).unwrap();
    h.take();
    // tarpit the RCPT reply by 5s: NOOP is not answered before either
    let d = Decision::reject(Reply::new(450, (4, 7, 1), "slow down\r\n250 injected\nsecond line"))
        .with_delay(Duration::from_secs(5));
    h.s.decide(d, Time(10)).unwrap();
    assert_eq!(h.take(), "");
    assert_eq!(h.s.poll_timeout(), Some(Time(5010)));
    h.s.handle_timeout(Time(5009));
    assert_eq!(h.take(), "");
    h.s.handle_timeout(Time(5010));
    assert_eq!(h.take(), "450-4.7.1 slow down?\n450-4.7.1 250 injected\n450 4.7.1 second line\n250 2.0.0 OK\n");
    // close after the reply
    let f = run(
        cfg(),
        Box::new(|e| match e {
            Event::Mail { .. } => Decision::reject(Reply::new(421, (4, 7, 0), "bye")).with_close(),
            _ => Decision::accept(),
        }),
        format!("{EHLO}MAIL FROM:<a@b.example>\r\nNOOP\r\n").as_bytes(),
    );
    assert_eq!(f[2..], ["421 4.7.0 bye"]);
    // custom accept text, default reject text
    let f = run(
        cfg(),
        Box::new(|e| match e {
            Event::Mail { .. } => Decision::accept().with_reply(Reply::new(250, (2, 1, 0), "fine")),
            Event::Rcpt { .. } => Decision::default(),
            _ => Decision::accept(),
        }),
        format!("{EHLO}MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\n").as_bytes(),
    );
    assert_eq!(f[2..], ["250 2.1.0 fine", "550 5.7.1 Recipient rejected"]);
}

#[test]
fn vrfy_expn_enabled_go_to_host() {
    let mut c = cfg();
    c.vrfy_enabled = true;
    c.expn_enabled = true;
    let f = run(
        c,
        Box::new(|e| match e {
            Event::Vrfy { arg } => Decision::accept().with_reply(Reply::new(250, (2, 1, 5), format!("<{arg}@x>"))),
            Event::Expn { .. } => Decision::default(),
            _ => Decision::accept(),
        }),
        b"VRFY joe\r\nEXPN list\r\n",
    );
    assert_eq!(f[1..], ["250 2.1.5 <joe@x>", "550 5.7.1 Access denied"]);
}

#[test]
fn enhanced_codes_can_be_off() {
    let mut c = cfg();
    c.extensions.enhanced_status_codes = false;
    let f = run(c, accept_all(), b"HELO x\r\nMAIL FROM:<a@b.example>\r\nFOO\r\n");
    assert_eq!(f[2..], ["250 Sender OK", "500 Command unrecognized"]);
}

#[test]
fn input_overflow_closes() {
    let mut c = cfg();
    c.max_input_buffer = 1024;
    let mut h = H::manual(c);
    h.s.decide(Decision::accept(), Time(0)).unwrap();
    h.take();
    h.send(b"EHLO x\r\n");
    assert!(h.s.input_room() >= 1000);
    // decision pending: buffer fills, then overflows
    h.send(&b"NOOP\r\n".repeat(300));
    assert_eq!(h.s.input_room(), 0);
    h.s.decide(Decision::accept(), Time(0)).unwrap();
    let out = h.take();
    assert!(out.ends_with("421 4.7.0 Too much pipelined input\n"), "{out}");
    assert!(h.s.is_closed());
}

#[test]
fn large_pipelined_buffer_is_linear() {
    let mut h = H::manual(cfg());
    h.s.decide(Decision::accept(), Time(0)).unwrap();
    h.send(b"EHLO x\r\n");
    // 40k commands wait behind the EHLO decision, then run in one go
    let noops = b"NOOP\r\n".repeat(50_000);
    h.send(&noops[..cfg().max_input_buffer - 100]);
    let start = std::time::Instant::now();
    h.s.decide(Decision::accept(), Time(0)).unwrap();
    assert!(start.elapsed() < Duration::from_secs(5));
    let out = h.take();
    assert_eq!(out.matches("250 2.0.0 OK").count(), (cfg().max_input_buffer - 100) / 6);
}

#[test]
fn shutdown_and_eof() {
    let mut h = H::new(cfg(), accept_all());
    h.take();
    h.s.shutdown(Some(Reply::new(421, (4, 4, 2), "Timeout")), Time(5));
    assert_eq!(h.take(), "421 4.4.2 Timeout\n");
    assert!(h.s.is_closed());
    let mut h = H::new(cfg(), accept_all());
    h.send(b"EHLO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\npartial");
    h.s.handle_eof(Time(1));
    h.pump();
    assert!(h.s.is_closed());
    assert!(h.messages().is_empty());
    assert!(matches!(h.events.last(), Some(Event::Closed)));
}

/// Deterministic randomized run of the fuzz closures (the same code the
/// cargo-fuzz targets call), so CI exercises them without nightly.
mod randomized {
    use super::super::fuzzing;

    const PIECES: &[&[u8]] = &[
        b"EHLO c.example\r\n",
        b"HELO c\r\n",
        b"MAIL FROM:<a@b.example>\r\n",
        b"MAIL FROM:<> BODY=BINARYMIME SIZE=50\r\n",
        b"MAIL FROM:<a@b.example> SMTPUTF8 RET=FULL ENVID=x+2B\r\n",
        b"RCPT TO:<c@d.example>\r\n",
        b"RCPT TO:<postmaster> NOTIFY=NEVER ORCPT=rfc822;a@b\r\n",
        b"DATA\r\n",
        b"BDAT 5\r\n",
        b"BDAT 0 LAST\r\n",
        b"BDAT 3 LAST\r\n",
        b"RSET\r\n",
        b"NOOP\r\n",
        b"QUIT\r\n",
        b"VRFY x\r\n",
        b"STARTTLS\r\n",
        b"AUTH PLAIN\r\n",
        b"AUTH LOGIN AGFsaWNlAHNlY3JldA==\r\n",
        b"AGFsaWNl\r\n",
        b"*\r\n",
        b"Subject: x\r\n",
        b"\r\n.\r\n",
        b".\r\n",
        b"..x\r\n",
        b"\r\n",
        b"\n",
        b"\r",
        b".",
        b"\x00",
        b"\xff\xfe",
        b"a",
    ];

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    fn gen(rng: &mut Rng, max_pieces: u64) -> Vec<u8> {
        let mut v = vec![rng.next() as u8, rng.next() as u8];
        let n = rng.next() % max_pieces;
        for _ in 0..n {
            if rng.next() & 7 == 0 {
                let k = rng.next() % 8;
                for _ in 0..k {
                    v.push(rng.next() as u8);
                }
            } else {
                let p = PIECES[(rng.next() % PIECES.len() as u64) as usize];
                v.extend_from_slice(p);
            }
        }
        v
    }

    #[test]
    fn smtp_commands_100k() {
        let mut rng = Rng(0x5eed_1234_abcd_0001);
        for _ in 0..100_000 {
            let input = gen(&mut rng, 24);
            fuzzing::smtp_commands(&input);
        }
    }

    #[test]
    fn data_receiver_100k() {
        let mut rng = Rng(0x5eed_1234_abcd_0002);
        for _ in 0..100_000 {
            let mut input = gen(&mut rng, 12);
            input.push(rng.next() as u8);
            fuzzing::data_receiver(&input);
        }
    }
}
