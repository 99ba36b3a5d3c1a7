//! Fuzzing entry point for the queue side (issue 11): what the queue manager does with the
//! bytes of a message a client sent, from header scanning to the route and bounce stages and
//! the DSN that returns it. Shared by the cargo-fuzz target `queue_message` in `runtime/fuzz`
//! and a deterministic unit test over generated inputs and the real-message corpus. Not a
//! stable API. It panics only when something on that path does.

use std::sync::OnceLock;

use mailpolicy_lang::ir::{Program, Stage};

use crate::conn::{QueuedMessage, QueuedRcpt, SessionRecord};
use crate::eval::{Answer, Run, Step};
use crate::headers::{self, Edit};
use crate::record::{stage_facts, InQueue, QueueStage};
use crate::routing::RouteRun;
use crate::smtp::{Reply, ReversePath};
use crate::transport::driver::DeliveryOutcome;
use crate::transport::dsn::{self, DsnRecipient, NoticeKind};

/// A policy whose queue-side stages read what a message can carry: header fields (decoded
/// address fields included), the body line by line, attachments, interpolations of header
/// values into new fields and log lines.
const POLICY: &str = r#"
list local_domains = domains ["example.com"];
server {
  hostname "mx.test";
  local_domains local_domains;
}
on route {
  if header "subject" :regex "^(re|fwd?):" { header add "X-Thread" "${header.subject}"; }
  if header "from" :contains "<" and header "to" :matches "*@*" { log "from ${header.from} to ${header.to}"; }
  if body :regex "unsubscribe$" { header replace "X-List" "yes"; }
  if attachment.names :matches ["*.exe", "*.scr"] { reject 550 5.7.1 "no executables"; }
  if attachment.types :contains "multipart/" { header remove "X-Mailer"; }
  if message.size > 1M { tempfail 451 4.3.1 "later"; }
  if header "received" is not null { log "hops ${header.received}"; }
  deliver maildir;
}
on bounce {
  if header "subject" :contains "spam" { discard; }
}
"#;

fn program() -> &'static Program {
    static PROG: OnceLock<Program> = OnceLock::new();
    PROG.get_or_init(|| {
        let loader = mailpolicy_lang::MemLoader::single("fuzz.mailpolicy", POLICY);
        match mailpolicy_lang::compile("fuzz.mailpolicy", &loader).program {
            Some(p) => p,
            None => panic!("the fuzzing policy does not compile"),
        }
    })
}

/// `queue_message` target: `input` is a message as a client could have sent it.
pub fn queue_message(input: &[u8]) {
    // Header scanning as the queue manager and the spool do it.
    let end = headers::header_end(input);
    let head = input.get(..end).unwrap_or(input);
    for f in headers::fields(head) {
        let _ = headers::field_name(input.get(f).unwrap_or_default());
    }
    let _ = headers::received_count(input);
    let _ = headers::line_ending(input);
    let edited = headers::edit(
        input,
        "X-Added: 1\r\n",
        &[
            Edit::Remove("received".into()),
            Edit::Replace("subject".into(), "x".into()),
            Edit::Add("a".into(), "b".into()),
        ],
    );
    assert!(edited.starts_with(b"X-Added: 1"), "edits prepend the fields (in the message's own line end)");

    // The route and bounce stages over the facts the queue builds from the message.
    let prog = program();
    let msg = QueuedMessage {
        sender: "a@example.org".into(),
        recipients: vec![QueuedRcpt {
            address: "u@example.com".into(),
            notify: vec!["FAILURE".into()],
            ..Default::default()
        }],
        data: input.to_vec(),
        client_ip: "192.0.2.1".into(),
        helo: "c.example.org".into(),
        ..Default::default()
    };
    let msg = QueuedMessage { session: SessionRecord::internal(prog, "mx.test"), ..msg };
    let rcpt = msg.recipients.first().cloned().unwrap_or_default();
    let (facts, state) = stage_facts(prog, &msg, QueueStage::Route(&rcpt), InQueue::default());
    // Every host request answered as a host with empty tables would; a bounded number of
    // rounds (each answer lets the stage go further).
    let mut route = RouteRun::new(prog, facts.clone(), state.clone());
    for _ in 0..64 {
        match route.step(prog) {
            Step::Need(r) => route.answer(r, Answer::Value(None)),
            Step::Done(_) => break,
        }
    }
    let mut bounce = Run::new(prog, Stage::Bounce);
    let mut st = state;
    for _ in 0..64 {
        match bounce.step(prog, &facts, &mut st) {
            Step::Need(r) => bounce.answer(r, Answer::Value(None)),
            Step::Done(_) => break,
        }
    }

    // The DSN that returns the message (RET=HDRS and RET=FULL).
    let sender = ReversePath::Null;
    let outcome = DeliveryOutcome::Failed(Reply::new(550, (5, 1, 1), "no such user"));
    let e = DsnRecipient::from_outcome(NoticeKind::Failure, "u@example.com", None, &outcome, None, 0);
    for ret in [Some(crate::smtp::Ret::Hdrs), Some(crate::smtp::Ret::Full)] {
        let d = dsn::Dsn {
            kind: NoticeKind::Failure,
            hostname: "mx.test",
            sender: &sender,
            envid: None,
            ret,
            arrival_date: 0,
            now: 0,
            recipients: std::slice::from_ref(&e),
            message: input,
            size_limit: 50_000,
            utf8: false,
        };
        let _ = dsn::build_dsn(&d);
    }
}

#[cfg(test)]
mod tests {
    /// Deterministic stand-in for the fuzzer on stable: generated messages built from the
    /// pieces that broke parsers before (bare LF, 8-bit bytes in field names, unclosed MIME
    /// boundaries, encoded words, folded lines), cut at every length of the first bytes.
    #[test]
    fn queue_side_survives_generated_messages() {
        let pieces: &[&[u8]] = &[
            b"Received: from a\r\n",
            b"X-Abcdef\xff: y\r\n",
            b"Subject: =?utf-8?B?w7w=?= re: x\r\n",
            b"Subject: =?x?Q?=ZZ?=\n",
            b"From: \"R\xc3\xbcbezahl\" <r@example.org>, bad@\r\n",
            b"To: group: a@b, c@d;\r\n",
            b"Content-Type: multipart/mixed; boundary=\"b\"\r\n",
            b"Content-Type: multipart/alternative; boundary=\r\n",
            b"\r\n",
            b"\n",
            b"--b\r\nContent-Type: application/octet-stream; name=\"x.exe\"\r\n\r\nAAAA\r\n",
            b"--b\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nunsubscribe\r\n",
            b"--b--\r\n",
            b" folded continuation\r\n",
            b"\xe2\x82",
            b":\r\n",
        ];
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..3000 {
            let mut m = Vec::new();
            for _ in 0..(seed % 12) {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                m.extend_from_slice(pieces[(seed >> 33) as usize % pieces.len()]);
            }
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let cut = if m.is_empty() { 0 } else { (seed >> 40) as usize % (m.len() + 1) };
            super::queue_message(&m);
            super::queue_message(m.get(..cut).unwrap_or_default());
        }
    }

    /// The real messages and the ones that stopped the queue before (`../shared`).
    #[test]
    fn queue_side_survives_the_corpus() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared");
        let mut n = 0;
        for dir in ["corpus/messages", "poison"] {
            let mut stack = vec![root.join(dir)];
            while let Some(d) = stack.pop() {
                let Ok(rd) = std::fs::read_dir(&d) else { continue };
                for e in rd.flatten() {
                    let p = e.path();
                    if p.is_dir() {
                        stack.push(p);
                    } else if let Ok(bytes) = std::fs::read(&p) {
                        super::queue_message(&bytes);
                        n += 1;
                    }
                }
            }
        }
        // CI lays ../shared beside the project (as the daemon's corpus test expects too).
        assert!(n >= 900, "read {n} files of the corpus and poison messages under {}", root.display());
    }
}
