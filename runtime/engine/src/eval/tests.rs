//! The evaluator's unit tests (stage descriptions, message helpers, sender authentication).

#[cfg(test)]
mod describe_tests {
    use super::super::*;

    /// Operators read names, not Rust structures (issue 11).
    #[test]
    fn requests_and_answers_read_as_an_operator_writes_them() {
        let policy = "table users = list \"users.txt\";\non rcpt { if recipient.local not in users { reject; } }\n";
        let c = mailpolicy_lang::compile("p.mailpolicy", &mailpolicy_lang::MemLoader::single("p.mailpolicy", policy));
        let prog = c.program.expect("compiles");
        let r = Request::Lookup { table: TableId(0), key: "alice".into() };
        assert_eq!(r.describe(&prog), "lookup users \"alice\"");
        assert_eq!(
            Request::Dns { name: "example.com".into(), rtype: RrType::Mx }.describe(&prog),
            "dns example.com MX"
        );
        let rate =
            Request::Rate { counter: Counter::Connections, key: "client.ip=192.0.2.1".into(), window_ms: 60_000 };
        assert_eq!(rate.describe(&prog), "rate connections by client.ip=192.0.2.1 per 1m");
        assert_eq!(Answer::Value(None).to_string(), "not found");
        assert_eq!(Answer::Value(Some("OK".into())).to_string(), "\"OK\"");
        assert_eq!(Answer::Records(vec!["127.0.0.2".into()]).to_string(), "127.0.0.2");
        let t = RenderedTransport {
            kind: TransportKind::Smtp,
            dest: Some("[10.0.0.5]:25".into()),
            tls: TlsMode::Required,
            auth: None,
            ca: None,
            cert: None,
            root: None,
        };
        assert_eq!(t.to_string(), "smtp [10.0.0.5]:25 tls required");
    }
}

#[cfg(test)]
mod message_tests {
    use super::super::MessageFacts;

    #[test]
    fn mime_is_decoded() {
        let raw = b"From: a@example.net\r\nSubject: =?UTF-8?B?SUxPVkVZT1U=?=\r\nMIME-Version: 1.0\r\n\
Content-Type: multipart/mixed; boundary=\"b\"\r\n\r\n--b\r\nContent-Type: text/plain; charset=utf-8\r\n\
Content-Transfer-Encoding: base64\r\n\r\ndmlhZ3JhIG9mZmVy\r\n--b\r\nContent-Type: application/x-msdownload\r\n\
Content-Disposition: attachment; filename=\"invoice.exe\"\r\nContent-Transfer-Encoding: base64\r\n\r\nTVqQAA==\r\n--b--\r\n";
        let m = MessageFacts::parse(raw);
        assert_eq!(m.header("subject"), vec!["ILOVEYOU".to_string()], "encoded words are decoded");
        assert!(m.body.contains("viagra offer"), "base64 text parts are decoded: {:?}", m.body);
        assert_eq!(m.attachment_names, vec!["invoice.exe".to_string()]);
        assert!(m.attachment_types.contains(&"application/x-msdownload".to_string()), "{:?}", m.attachment_types);
        assert_eq!(m.header("from"), vec!["a@example.net".to_string()]);
    }

    #[test]
    fn folded_headers_are_unfolded() {
        let m = MessageFacts::parse(b"X-Long: one\r\n two\r\n\tthree\r\nSubject: s\r\n\r\nbody\r\n");
        assert_eq!(m.header("x-long"), vec!["one two three".to_string()]);
        assert_eq!(m.body.trim(), "body");
    }
}

#[cfg(test)]
mod sender_auth_tests {
    use super::super::*;

    fn prog() -> Program {
        let policy =
            "require \"spf\";\non mail { if spf :is \"fail\" { reject; } if spf :is \"temperror\" { tempfail; } }\n";
        let c = mailpolicy_lang::compile("p.mailpolicy", &mailpolicy_lang::MemLoader::single("p.mailpolicy", policy));
        c.program.expect("compiles")
    }

    /// In a session a stage asks `Conn` for sender authentication, never the host: the
    /// check comes out as `SessionStep::SenderAuth` and its answer decides.
    #[test]
    fn a_session_asks_conn() {
        let prog = prog();
        let (facts, mut state) = (Facts::default(), State::new(&prog));
        let mut run = Run::new(&prog, Stage::Mail);
        match run.step_session(&prog, &facts, &mut state) {
            SessionStep::SenderAuth(c) => assert_eq!(c, AuthCheck::Spf),
            SessionStep::Need(r) => panic!("the host was asked {r:?}"),
            SessionStep::Done(v) => panic!("decided without the check: {:?}", v.outcome),
        }
        run.answer_sender_auth(AuthCheck::Spf, Answer::Value(Some("fail".into())));
        match run.step_session(&prog, &facts, &mut state) {
            SessionStep::Done(v) => assert!(matches!(v.outcome, Outcome::Reject(_)), "{:?}", v.outcome),
            _ => panic!("asked again"),
        }
    }

    /// Outside a session (`Run::step`) nothing is asked: the record's word, or `temperror`
    /// for a check the record does not hold.
    #[test]
    fn the_queue_side_reads_the_record() {
        let prog = prog();
        let mut state = State::new(&prog);
        let recorded = Facts {
            recorded_auth: Some(AuthWords { spf: Some("fail".into()), ..AuthWords::default() }),
            ..Facts::default()
        };
        for (facts, want_reject) in [(recorded, true), (Facts::default(), false)] {
            match Run::new(&prog, Stage::Mail).step(&prog, &facts, &mut state) {
                Step::Done(v) if want_reject => assert!(matches!(v.outcome, Outcome::Reject(_)), "{:?}", v.outcome),
                Step::Done(v) => assert!(matches!(v.outcome, Outcome::Tempfail(_)), "{:?}", v.outcome),
                Step::Need(r) => panic!("the host was asked {r:?}"),
            }
        }
    }
}
